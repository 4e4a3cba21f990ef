"""``cascade demo``: the whole loop on embedded defaults, on real text, until generation 1 exists.

Embedded Redis, local Ray, SmolLM2-135M converted into gen-0000; Python standard-library sources
found on this machine are published as interactions (the model learns to continue code it is
shown); the daemon learns them; once the stream is drained the demo asks for a reduction (as
``cascade reduce`` would), and prints generation 1's size and held-out perplexity next to
generation 0's. With serving on (the default) it ends by asking one prompt of gen-0000 and of the promoted
generation through the OpenAI-compatible API, and prints the curl command to ask your own.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time

from daemon.config import Settings
from daemon.corpus import code_interactions
from daemon.registry import Registry
from daemon.stream import group_info

log = logging.getLogger("cascade.demo")

# Demo-sized defaults, used unless the operator set the same names (environment or --config).
DEMO_DEFAULTS = {"max_seq_len": 128, "batch_size": 8, "window_steps": 2, "reduce_every": 0,
                 "heldout_fraction": 0.12, "heal_steps": 12, "calibration_items": 48, "learning_rate": 3e-4,
                 "reduce_keep": 0.9}
DEMO_INTERACTIONS = 128
DEMO_PROMPT = "Write a Python function that returns the squares of a list of numbers."


def run_demo(settings: Settings) -> int:
    from daemon.config import load_settings
    from daemon.service import Daemon

    overrides = {k: v for k, v in DEMO_DEFAULTS.items() if k not in settings.model_fields_set}
    settings = load_settings(None, **{**settings.model_dump(include=settings.model_fields_set), **overrides})
    print(f"cascade demo: state in {settings.home.resolve()}; converting the foundation on first run may take a minute")
    daemon = Daemon(settings)
    promoted, outcome = threading.Event(), {}
    daemon.on_reduction = lambda rep: (outcome.update(report=rep), promoted.set())
    daemon.start(handle_signals=True)
    runner = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    runner.start()

    records = code_interactions(limit_files=60, seed=settings.seed)[:DEMO_INTERACTIONS]
    pipe = daemon.redis.pipeline(transaction=False)
    for i, rec in enumerate(records):
        pipe.xadd(settings.stream, {"prompt": rec["prompt"], "response": rec["response"], "id": f"demo-{i}",
                                    "meta": json.dumps(rec["meta"])})
    pipe.execute()
    print(f"published {len(records)} interactions from the Python standard library to {settings.stream}")

    registry = Registry(settings.registry_root)
    main = registry.lineage("main")
    gen0 = main.current()
    t0, last, asked = time.monotonic(), "", False
    try:
        while not promoted.is_set() and not daemon._stop.is_set():
            promoted.wait(3.0)
            info = group_info(daemon.redis, settings.stream, settings.group)
            if not asked and info.lag == 0 and info.pending == 0 and not daemon.jobs:
                daemon.redis.xadd(settings.control_stream, {"command": "reduce", "lineage": "main"})
                print("stream drained: reducing main (merge, score on its data, prune, reconstruct, heal, gate)")
                asked = True
            st = main.live_state() or {}
            ho = st.get("heldout_loss") or {}
            jobs = ",".join(f"{j.kind}" for j in daemon.jobs.values()) or "idle"
            line = (f"[{time.monotonic() - t0:6.0f}s] learned {st.get('interactions_learned', 0):>4}/{len(records)}"
                    f"  steps {st.get('update_steps', 0):>3}  held-out loss "
                    f"{' '.join(f'{v:.3f}' for v in ho.values()) or '-':<6}  lag {info.lag}  pending {info.pending}"
                    f"  {main.current()}  [{jobs}]")
            if line[9:] != last[9:]:
                print(line, flush=True)
            last = line
        rep = outcome.get("report")
        if rep is not None and rep.outcome == "promoted" and settings.serve:
            ask_through_api(settings, f"main/{gen0}", f"main/{rep.generation}")
    finally:
        daemon.request_stop()
        runner.join(timeout=600)
        daemon.stop()
    rep = outcome.get("report")
    if rep is None:
        print("cascade demo: stopped before the reduction finished")
        return 1
    if rep.outcome != "promoted":
        print(f"cascade demo: the reduction was {rep.outcome}: {rep.detail[:300]}")
        return 1
    return _summary(registry, settings, gen0)


def _summary(registry: Registry, settings: Settings, gen0: str) -> int:
    from learners._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoTokenizer

    from daemon.registry import read_json
    from learners.data import Example
    from learners.update import evaluate_loss, load_causal_lm

    main = registry.lineage("main")
    gen1 = main.current()
    card1 = main.card(gen1)
    heldout = [Example.from_json(x) for v in read_json(main.live_target() / "heldout.json").values() for x in v]
    tok = AutoTokenizer.from_pretrained(str(main.path / gen0))
    ppl0 = math.exp(evaluate_loss(load_causal_lm(main.path / gen0), tok, heldout, settings.max_seq_len))
    ppl_spec = card1["reduction"]["gate"]["ppl_before"]
    ppl1 = card1["eval"]
    print()
    print(f"lineage main ({len(heldout)} held-out interactions never trained on)")
    print(f"  {'generation':<28}{'parameters':>14}{'held-out perplexity':>22}")
    print(f"  {gen0 + ' (foundation)':<28}{main.card(gen0)['n_params']:>14,}{ppl0:>22.2f}")
    print(f"  {gen0 + ' + live adapter':<28}{main.card(gen0)['n_params']:>14,}"
          f"{' '.join(f'{v:.2f}' for v in ppl_spec.values()):>22}")
    print(f"  {gen1 + ' (reduced)':<28}{card1['n_params']:>14,}"
          f"{' '.join('%.2f' % v['perplexity'] for v in ppl1.values()):>22}")
    shrink = 1 - card1["n_params"] / main.card(gen0)["n_params"]
    print(f"  {gen1} is {shrink:.1%} smaller than {gen0}; card: {main.path / gen1 / 'card.json'}")
    return 0


def ask_through_api(settings: Settings, *models: str) -> None:
    """The same prompt, greedy, to each model through the running API; then a curl line to paste."""
    import urllib.request

    url = f"http://{settings.serve_host}:{settings.serve_port}/v1/chat/completions"
    keys = settings.api_key_list()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {keys[0]}"} if keys else {})}
    print(f"\nasking through the API ({url}): {DEMO_PROMPT!r}")
    for model in models:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": DEMO_PROMPT}],
                           "max_tokens": 64, "temperature": 0}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=300) as resp:
                doc = json.load(resp)
        except OSError as e:
            print(f"  {model}: the API did not answer ({e})")
            continue
        answer = doc["choices"][0]["message"]["content"].strip()
        print(f"\n  {model} (weights {doc['system_fingerprint']}):\n    " + answer.replace("\n", "\n    "))
    auth = ' -H "Authorization: Bearer $CASCADE_API_KEY"' if keys else ""
    print("\nask your own while `cascade run` (or `cascade serve`) runs:\n"
          f"  curl -s {url} -H 'Content-Type: application/json'{auth} \\\n"
          """    -d '{"model": "main", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}'""")
