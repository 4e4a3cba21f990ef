"""Fork a specialized successor lineage from a precursor generation of any lineage."""
from __future__ import annotations

import os
import shutil

from daemon.registry import Registry, RegistryError, check_lineage, gen_name, generation_card


def fork_lineage(registry: Registry, source: str, new: str) -> str:
    """Create lineage ``new`` whose gen-0000 is generation ``source`` ("lineage/gen-NNNN").

    Weights are hard-linked where the filesystem allows (generations are immutable), else copied.
    Returns ``new/gen-0000``.
    """
    check_lineage(new)
    src = registry.resolve_generation(source)
    dest = registry.lineage(new)
    if dest.exists() or dest.generations():
        raise RegistryError(f"lineage {new!r} already exists")
    src_card = registry.lineage(source.split("/")[0]).card(src.name)
    staging = dest.staging_dir()
    try:
        for f in src.iterdir():
            if f.is_file() and f.name != "card.json":
                try:
                    os.link(f, staging / f.name)
                except OSError:
                    shutil.copy2(f, staging / f.name)
        card = generation_card(new, 0, source, src_card["n_params"], eval=src_card.get("eval"), forked_from=source)
        dest.publish_generation(staging, gen_name(0), card)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    dest.set_current(gen_name(0))
    return f"{new}/{gen_name(0)}"
