"""The current generation's exported files (CONTRACT.md "Exports"), as its ``card.json`` lists them.

A file is served only if the card lists it and its path stays inside the generation's ``export/`` directory once
every symlink is resolved; anything else is "not found", never read.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from daemon.registry import LINEAGE_RE, Registry, RegistryError
from daemon.serving.protocol import APIError


def _current(registry: Registry, lineage: str) -> tuple[str, Path, list[dict]]:
    if not LINEAGE_RE.match(lineage):
        raise APIError(404, f"no lineage {lineage[:70]!r}", "lineage_not_found")
    d = registry.lineage(lineage)
    try:
        gen = d.current()
        card = d.card(gen)
    except (RegistryError, OSError, ValueError):
        raise APIError(404, f"no lineage {lineage!r}", "lineage_not_found") from None
    exports = card.get("exports") or []
    return gen, d.path / gen, [e for e in exports if isinstance(e, dict) and isinstance(e.get("path"), str)]


def list_exports(registry: Registry, lineage: str) -> dict:
    gen, _, exports = _current(registry, lineage)
    return {"object": "list", "data": [
        {"file": PurePosixPath(e["path"]).name, "format": e.get("format"), "type": e.get("type"),
         "bytes": e.get("bytes"), "sha256": e.get("sha256"), "generation": f"{lineage}/{gen}"} for e in exports]}


def export_file(registry: Registry, lineage: str, name: str) -> tuple[Path, dict]:
    """The file ``name`` of the lineage's current exports and its card entry; APIError 404 otherwise."""
    gen, gen_dir, exports = _current(registry, lineage)
    missing = APIError(404, f"{lineage}/{gen} has no export {name[:100]!r}", "export_not_found")
    entry = next((e for e in exports if PurePosixPath(e["path"]).name == name), None)
    if entry is None or "/" in name or name in ("", ".", ".."):
        raise missing
    root = (gen_dir / "export").resolve()
    path = (gen_dir / entry["path"]).resolve()
    if not path.is_relative_to(root) or path == root or not path.is_file():
        raise missing
    return path, entry
