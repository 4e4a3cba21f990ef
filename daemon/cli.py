"""``cascade``: run the daemon, feed it, watch it, and steer it (see CONTRACT.md for the contract)."""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from daemon.config import Settings, SettingsError, load_settings
from daemon.registry import Registry, RegistryError
from daemon.supervisor import StartupError

log = logging.getLogger("cascade.cli")
MAX_JSONL_LINE = 1 << 20


class CliError(Exception):
    """One sentence for stderr; exit code 1."""


# -- helpers ------------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(settings: Settings | None, level=logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings is not None and settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Read by transformers and huggingface_hub when (and if) a command loads a model.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class RedisHandle:
    """A client for the configured Redis, starting the embedded one for the duration if needed."""

    def __init__(self, settings: Settings) -> None:
        from daemon.embedded_redis import EmbeddedRedis
        from daemon.stream import connect

        self.embedded = None
        url = settings.redis_url
        if url is None:
            self.embedded = EmbeddedRedis(settings.home).start()
            url = self.embedded.url
        self.r = connect(url)

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def read_jsonl(path: Path, lineage: str | None) -> list[dict[str, str]]:
    """Stream fields for each record of a JSONL file; raises CliError naming the bad line."""
    if not path.is_file():
        raise CliError(f"{path} does not exist")
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(line) > MAX_JSONL_LINE:
                raise CliError(f"{path}:{n}: line is longer than {MAX_JSONL_LINE} bytes")
            try:
                rec = json.loads(line)
            except ValueError:
                raise CliError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(rec, dict):
                raise CliError(f"{path}:{n}: each line must be a JSON object")
            if "text" in rec and "response" not in rec:
                rec = {**{k: v for k, v in rec.items() if k != "text"}, "prompt": "", "response": rec["text"]}
            if not isinstance(rec.get("response"), str):
                raise CliError(f"{path}:{n}: needs a string 'response' (or 'text')")
            fields = {}
            for k, v in rec.items():
                if k == "meta":
                    fields[k] = json.dumps(v)
                elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
                    fields[k] = str(v)
                else:
                    raise CliError(f"{path}:{n}: field {k!r} must be a string or number")
            fields.setdefault("prompt", "")
            if lineage:
                fields["lineage"] = lineage
            out.append(fields)
    return out


def lineage_rows(registry: Registry) -> list[dict]:
    rows = []
    for name in registry.lineages():
        d = registry.lineage(name)
        gen = d.current()
        card = d.card(gen)
        state = d.live_state() or {}
        rows.append({"lineage": name, "generation": gen, "n_params": card["n_params"],
                     "update_steps": state.get("update_steps", 0),
                     "interactions_learned": state.get("interactions_learned", 0),
                     "heldout_loss": state.get("heldout_loss", {}), "live_base": state.get("base"),
                     "fates": fates(state), "source_forgetting": state.get("source_forgetting", {}),
                     "forgetting_bound": state.get("forgetting_bound"), "updated_at": state.get("updated_at"),
                     "reducing": state.get("reduction_pending")})
    return rows


def fates(state: dict) -> dict:
    """What became of a lineage's interactions so far (from its checkpoint's counters)."""
    c = state.get("counters", {})
    return {"learned": c.get("interactions_learned", 0), "heldout": c.get("heldout_seen", 0),
            "deferred_waiting": state.get("deferred_waiting", 0), "deferred": c.get("deferred", 0),
            "refused": c.get("refused", 0), "skipped": c.get("skipped", 0), "rollbacks": c.get("rollbacks", 0)}


def generation_tree(registry: Registry, only: str | None = None) -> list[dict]:
    nodes = []
    for name in registry.lineages():
        if only and name != only:
            continue
        d = registry.lineage(name)
        current = d.current()
        for gen in d.generations():
            card = d.card(gen)
            ev = card.get("eval") or {}
            ppl = {k: v.get("perplexity") for k, v in ev.items() if isinstance(v, dict)}
            nodes.append({"id": f"{name}/{gen}", "lineage": name, "generation": card["generation"],
                          "parent": card.get("parent"), "n_params": card["n_params"], "current": gen == current,
                          "created_at": card.get("created_at"), "perplexity": ppl})
    return nodes


def daemon_running(settings: Settings) -> bool:
    pidfile = settings.home / "daemon.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


# -- commands -----------------------------------------------------------------------------------------
def cmd_run(args, settings: Settings) -> int:
    from daemon.service import Daemon

    daemon = Daemon(settings)
    pidfile = settings.home / "daemon.pid"
    try:
        daemon.start(handle_signals=True)
        pidfile.write_text(str(os.getpid()))
        daemon.run()
    finally:
        daemon.stop()
        pidfile.unlink(missing_ok=True)
    return 0


def cmd_publish(args, settings: Settings) -> int:
    records = read_jsonl(Path(args.file), args.lineage)
    h = RedisHandle(settings)
    try:
        pipe = h.r.pipeline(transaction=False)
        for i, fields in enumerate(records, 1):
            pipe.xadd(settings.stream, fields)
            if i % 1000 == 0:
                pipe.execute()
        pipe.execute()
    finally:
        h.close()
    print(f"published {len(records)} interactions to {settings.stream}")
    return 0


REPLAY_FIELDS = ("prompt", "response", "lineage", "reward")


def skipped_entries(r, settings: Settings, lineage: str | None, reason: str | None, count: int) -> list[dict]:
    """The newest ``count`` entries of ``<stream>:skipped`` (oldest first), of ``lineage`` / ``reason`` if given."""
    out: list[dict] = []
    for eid, fields in r.xrevrange(settings.skipped_stream, count=max(count * 20, 1000) if (lineage or reason)
                                   else count):
        x = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
        if (lineage and x.get("lineage") != lineage) or (reason and x.get("reason") != reason):
            continue
        out.append({"entry_id": eid.decode(), **x})
        if len(out) == count:
            break
    return out[::-1]


def replay_fields(x: dict) -> dict[str, str]:
    """A skipped entry published again: a new ``id`` (the old one is in the ledger) and ``meta.curation``
    ``off``, so it is learned whatever the curation decided."""
    try:
        meta = json.loads(x.get("meta") or "{}")
    except ValueError:
        meta = {}
    meta = {**(meta if isinstance(meta, dict) else {}), "curation": "off"}
    ident = "replay-" + x.get("id", x["entry_id"])
    if len(ident) > 128:
        import hashlib

        ident = "replay-" + hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()
    return {**{k: x[k] for k in REPLAY_FIELDS if k in x}, "id": ident, "meta": json.dumps(meta)}


def cmd_skipped(args, settings: Settings) -> int:
    h = RedisHandle(settings)
    try:
        entries = skipped_entries(h.r, settings, args.lineage, args.reason, args.count)
        if args.replay:
            pipe = h.r.pipeline(transaction=False)
            for x in entries:
                pipe.xadd(settings.stream, replay_fields(x))
            pipe.execute()
    finally:
        h.close()
    if args.json:
        print(json.dumps({"stream": settings.skipped_stream, "replayed": bool(args.replay), "entries": entries}))
    elif args.replay:
        print(f"published {len(entries)} skipped interactions again to {settings.stream} (curation off for them)")
    else:
        for x in entries:
            text = (x.get("response", "")[:60]).replace("\n", " ")
            print(f"{x['entry_id']}  {x.get('lineage', '')}  {x.get('reason', ''):<16} id={x.get('id', '')}  "
                  f"{text!r}  ({x.get('detail', '')})")
        print(f"{len(entries)} skipped entries shown from {settings.skipped_stream}")
    return 0


def daemon_health(settings: Settings) -> dict | None:
    """The running daemon's ``/healthz`` document (its parts, which are down and since when), or None
    when nothing answers on CASCADE_METRICS_HOST/PORT."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if settings.metrics_host in ("0.0.0.0", "::", "") else settings.metrics_host
    url = f"http://{host}:{settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return json.loads(resp.read(1 << 20))
    except urllib.error.HTTPError as e:  # 503: degraded, with the same document
        try:
            return json.loads(e.read(1 << 20))
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def health_lines(doc: dict) -> list[str]:
    """One line per part that is down (since when, for how long, why), or one saying all are up."""
    if not doc.get("daemon_running"):
        return []
    health = doc.get("health")
    if health is None:
        return ["daemon parts: the daemon does not answer on its /healthz (starting, or CASCADE_METRICS_PORT differs)"]
    down = health.get("down") or {}
    if not down:
        return [f"daemon {health.get('status', '?')}: all parts up ({', '.join(health.get('parts') or [])})"]
    lines = [f"daemon {health.get('status', '?')}: {len(down)} part(s) down"]
    for name, p in down.items():
        lines.append(f"  {name} down since {p['since']} ({p['for_s']:.0f} s): {p['reason'] or '-'}"
                     f"  [restarts {p['restarts']}]")
    return lines


def status_doc(settings: Settings, registry: Registry, r) -> dict:
    """What ``cascade status`` shows: the consumer group's progress, every lineage's state on disk and,
    while the daemon runs, the health of its parts."""
    from daemon.stream import group_info

    running = daemon_running(settings)
    health = daemon_health(settings) if running else None
    info = group_info(r, settings.stream, settings.group)
    return {"stream": settings.stream, "group": settings.group, "length": info.length, "lag": info.lag,
            "pending": info.pending, "dead_letters": r.xlen(settings.dead_stream),
            "skipped": r.xlen(settings.skipped_stream),
            "daemon_running": running, "health": health, "lineages": lineage_rows(registry)}


def status_lines(doc: dict) -> list[str]:
    lines = [f"stream {doc['stream']} (group {doc['group']}): length {doc['length']}  lag {doc['lag']}  "
             f"pending {doc['pending']}  dead letters {doc['dead_letters']}  skipped {doc.get('skipped', 0)}  "
             f"daemon {'running' if doc['daemon_running'] else 'stopped'}",
             f"{'lineage':<16}{'generation':<12}{'parameters':>14}{'steps':>9}{'learned':>10}  held-out loss"]
    for r in doc["lineages"]:
        ho = " ".join(f"{k}={v:.3f}" for k, v in r["heldout_loss"].items()) or "-"
        lines.append(f"{r['lineage']:<16}{r['generation']:<12}{r['n_params']:>14,}{r['update_steps']:>9}"
                     f"{r['interactions_learned']:>10}  {ho}")
        f = r["fates"]
        handled = max(1, f["learned"] + f["deferred_waiting"] + f["refused"] + f["skipped"])
        shares = "  ".join(f"{k} {f[k] / handled:.0%}" for k in ("learned", "deferred_waiting", "refused", "skipped"))
        bound = r["forgetting_bound"]
        gaps = " ".join(f"{k}=+{v:.3f}" for k, v in r["source_forgetting"].items()) or "-"
        lines.append(f"{'':<16}fates: {shares.replace('deferred_waiting', 'deferred')} (rollbacks {f['rollbacks']})"
                     f"  forgetting per source {gaps}" + (f" (bound {bound:g})" if bound is not None else ""))
        if r.get("reducing"):
            snap = r["reducing"]
            lines.append(f"{'':<16}reducing {snap['parent']} in the background ({snap['trigger']}, snapshot {snap['id']} "
                         f"at step {snap['step']}); learning goes on")
    return lines + health_lines(doc)


def watch_status(settings: Settings, registry: Registry, r, interval: float, count: int | None,
                 as_json: bool) -> None:
    """Refresh the status every ``interval`` seconds, ``count`` times (until Ctrl-C when None).

    On a terminal each refresh replaces the screen; otherwise refreshes follow one another (with
    ``as_json``, one JSON document per line), so the output can be piped or logged. Redis being
    unreachable is shown as that refresh's content; the view keeps refreshing.
    """
    import redis

    clear = sys.stdout.isatty() and not as_json
    previous: dict[str, int] = {}
    for refresh in itertools.count(1):
        try:
            doc = status_doc(settings, registry, r)
        except redis.RedisError as e:
            doc = {"error": f"cannot reach Redis: {e}"}
        if as_json:
            print(json.dumps({"time": round(time.time(), 3), **doc}), flush=True)
        else:
            if "error" in doc:
                lines = [doc["error"]]
            else:
                learned = {row["lineage"]: row["interactions_learned"] for row in doc["lineages"]}
                gained = ", ".join(f"{k} +{v - previous[k]}" for k, v in learned.items() if k in previous)
                previous = learned
                lines = [*status_lines(doc), f"learned since the last refresh: {gained or '-'}"]
            head = f"cascade status  {time.strftime('%H:%M:%S')}  refresh {refresh}, every {interval:g}s"
            sys.stdout.write(("\x1b[H\x1b[2J" if clear else "\n" if refresh > 1 else "")
                             + "\n".join([head, *lines]) + "\n")
            sys.stdout.flush()
        if refresh == count:
            return
        time.sleep(interval)


def cmd_status(args, settings: Settings) -> int:
    import redis

    if not args.watch and (args.interval is not None or args.count is not None):
        raise CliError("--interval and --count only apply with --watch")
    registry = Registry(settings.registry_root)
    h = RedisHandle(settings)
    try:
        if args.watch:
            try:
                watch_status(settings, registry, h.r, args.interval or 2.0, args.count, args.json)
            except KeyboardInterrupt:  # the usual way to leave a live view
                pass
            return 0
        try:
            doc = status_doc(settings, registry, h.r)
        except redis.ConnectionError as e:  # Redis down: still say what the daemon reports of its parts
            running = daemon_running(settings)
            doc = {"error": f"cannot reach Redis: {e}", "daemon_running": running,
                   "health": daemon_health(settings) if running else None}
            print(json.dumps(doc, indent=1) if args.json else "\n".join(health_lines(doc)))
            raise CliError(doc["error"]) from None
    finally:
        h.close()
    print(json.dumps(doc, indent=1) if args.json else "\n".join(status_lines(doc)))
    return 0


def draw_tree(nodes: list[dict], path: Path) -> None:
    """A PNG of the lineage tree: one row per lineage, generations left to right, edges to parents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = {n["id"]: n for n in nodes}
    depth: dict[str, int] = {}

    def x_of(n) -> int:
        if n["id"] not in depth:
            parent = ids.get(n["parent"] or "")
            depth[n["id"]] = 0 if parent is None else x_of(parent) + 1
        return depth[n["id"]]

    rows = {name: i for i, name in enumerate(dict.fromkeys(n["lineage"] for n in nodes))}
    fig, ax = plt.subplots(figsize=(3 + 2.6 * (1 + max(x_of(n) for n in nodes)), 1.2 + 1.1 * len(rows)))
    for n in nodes:
        x, y = x_of(n), -rows[n["lineage"]]
        parent = ids.get(n["parent"] or "")
        if parent is not None:
            ax.annotate("", xy=(x, y), xytext=(x_of(parent), -rows[parent["lineage"]]),
                        arrowprops={"arrowstyle": "->", "color": "0.5", "shrinkA": 30, "shrinkB": 30})
        ppl = ", ".join(f"{v:.1f}" for v in n["perplexity"].values() if v) or "-"
        ax.text(x, y, f"{n['id']}\n{n['n_params'] / 1e6:.1f}M params\nppl {ppl}", ha="center", va="center",
                fontsize=8, bbox={"boxstyle": "round", "fc": "#cde" if n["current"] else "#eee", "ec": "0.4"})
    ax.set_xlim(-0.7, max(depth.values()) + 0.7)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    ax.set_title("cascade-lm lineage tree (current generations shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_generations(args, settings: Settings) -> int:
    nodes = generation_tree(Registry(settings.registry_root), args.lineage)
    if args.png and nodes:
        draw_tree(nodes, Path(args.png))
    if args.json:
        print(json.dumps({"generations": nodes}, indent=1))
        return 0
    if not nodes:
        raise CliError("the registry has no generations yet (start the daemon once)")
    children: dict[str | None, list[dict]] = {}
    ids = {n["id"] for n in nodes}
    for n in nodes:
        children.setdefault(n["parent"] if n["parent"] in ids else None, []).append(n)

    def show(n, prefix: str, last: bool, root: bool) -> None:
        ppl = " ".join(f"ppl[{k}]={v:.2f}" for k, v in n["perplexity"].items() if v)
        mark = " (current)" if n["current"] else ""
        branch = "" if root else ("└── " if last else "├── ")
        print(f"{prefix}{branch}{n['id']}  {n['n_params']:,} params{mark}{'  ' + ppl if ppl else ''}")
        kids = children.get(n["id"], [])
        for i, k in enumerate(kids):
            show(k, prefix + ("" if root else ("    " if last else "│   ")), i == len(kids) - 1, False)

    for r in children.get(None, []):
        show(r, "", True, True)
    return 0


def cmd_eval(args, settings: Settings) -> int:
    from learners._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from learners.data import Example
    from learners.update import evaluate_loss, load_causal_lm

    registry = Registry(settings.registry_root)
    target = Path(args.target)
    adapter = None
    if (target / "config.json").is_file():
        model_dir = target
    else:
        try:
            d = registry.lineage(args.target)
            model_dir = d.current_dir()
        except RegistryError as e:
            raise CliError(f"{args.target!r} is neither a model directory nor a lineage ({e})") from None
        state = d.live_state()
        if state and state.get("base") == d.current():
            adapter = d.live_target()
    records = read_jsonl(Path(args.data), None)
    examples = [Example(id=str(i), prompt=r.get("prompt", ""), response=r["response"]) for i, r in enumerate(records)]
    if not examples:
        raise CliError(f"{args.data} has no records")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_causal_lm(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    loss = evaluate_loss(model, tok, examples, settings.max_seq_len, settings.batch_size)
    doc = {"target": args.target, "model": str(model_dir), "adapter": str(adapter) if adapter else None,
           "records": len(examples), "loss": loss, "perplexity": math.exp(loss)}
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"{args.target}: loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f} over {len(examples)} records")
    return 0


def send_control(settings: Settings, fields: dict[str, str]) -> None:
    h = RedisHandle(settings)
    try:
        h.r.xadd(settings.control_stream, fields)
    finally:
        h.close()


def cmd_reduce(args, settings: Settings) -> int:
    from daemon.registry import check_lineage

    check_lineage(args.lineage)
    if not Registry(settings.registry_root).lineage(args.lineage).exists():
        raise CliError(f"lineage {args.lineage!r} does not exist")
    send_control(settings, {"command": "reduce", "lineage": args.lineage})
    print(f"asked the daemon to reduce lineage {args.lineage}")
    return 0


def cmd_simple_control(args, settings: Settings) -> int:
    send_control(settings, {"command": args.cmd})
    print(f"sent {args.cmd}")
    return 0


def cmd_fork(args, settings: Settings) -> int:
    from daemon.forking import fork_lineage
    from daemon.registry import check_lineage

    registry = Registry(settings.registry_root)
    check_lineage(args.to)
    registry.resolve_generation(args.source)
    if daemon_running(settings):
        send_control(settings, {"command": "fork", "from": args.source, "to": args.to})
        print(f"asked the daemon to fork {args.source} into lineage {args.to}")
    else:
        print(f"forked {args.source} into {fork_lineage(registry, args.source, args.to)}")
    return 0


def cmd_export(args, settings: Settings) -> int:
    from learners.export import FORMATS, TYPES, ExportError, export_gguf, file_name

    if args.format not in FORMATS:
        raise CliError(f"unsupported export format {args.format!r} (supported: {', '.join(FORMATS)})")
    if args.type not in TYPES:
        raise CliError(f"unsupported GGUF type {args.type!r} (supported: {', '.join(TYPES)})")
    gen_dir = Registry(settings.registry_root).resolve_generation(args.generation)
    lineage, _, gen = args.generation.partition("/")
    out = Path(args.out) if args.out else Path(file_name(lineage, gen, args.type))
    if out.is_dir():
        raise CliError(f"{out} is a directory; --out names the file to write")
    try:
        rec = export_gguf(gen_dir, out, args.type, name=args.generation)
    except ExportError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(rec.to_json()))
    else:
        note = f"; {len(rec.fallback)} tensors kept in f16 (rows not a multiple of 32)" if rec.fallback else ""
        print(f"wrote {rec.path} ({rec.type}, {rec.bytes:,} bytes, sha256 {rec.sha256}){note}")
    return 0


def cmd_serve(args, settings: Settings) -> int:
    from daemon.serving.runner import serve_forever

    return serve_forever(settings)


def cmd_edge(args, settings: Settings) -> int:
    from daemon.edge import run_edge
    from daemon.registry import check_lineage
    from learners.export import TYPES

    check_lineage(args.lineage)
    if args.type not in TYPES:
        raise CliError(f"unsupported GGUF type {args.type!r} (supported: {', '.join(TYPES)})")
    if not args.api.startswith(("http://", "https://")):
        raise CliError(f"--api must be an http:// or https:// URL (got {args.api!r})")
    return run_edge(args.api, args.lineage, args.type, Path(args.home), args.host, args.port,
                    args.api_key or os.environ.get("CASCADE_EDGE_API_KEY"), args.threads, args.poll, args.flush)


def cmd_demo(args, settings: Settings) -> int:
    from daemon.demo import run_demo

    return run_demo(settings)


# -- entry point --------------------------------------------------------------------------------------
def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text!r})")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cascade", description="Continual learning daemon for language models.")
    p.add_argument("--config", help="TOML settings file (also CASCADE_CONFIG)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("run", help="the daemon, in the foreground")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("demo", help="embedded defaults end to end; ends when generation 1 is promoted")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("publish", help="XADD a JSONL file of interactions")
    s.add_argument("file")
    s.add_argument("--lineage")
    s.set_defaults(fn=cmd_publish)
    s = sub.add_parser("status", help="stream lag/pending and per-lineage state")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="refresh until Ctrl-C (or --count refreshes)")
    s.add_argument("--interval", type=positive_float, metavar="S", help="seconds between refreshes (default 2)")
    s.add_argument("--count", type=positive_int, metavar="N", help="stop after N refreshes")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("skipped", help="what curation skipped, with the reasons (<stream>:skipped); --replay "
                       "publishes it again to be learned")
    s.add_argument("--lineage")
    s.add_argument("--reason")
    s.add_argument("--count", type=positive_int, default=50, metavar="N", help="newest N entries (default 50)")
    s.add_argument("--replay", action="store_true", help="publish them again, with curation off for them")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_skipped)
    s = sub.add_parser("generations", help="the lineage tree")
    s.add_argument("--lineage")
    s.add_argument("--json", action="store_true")
    s.add_argument("--png", metavar="FILE", help="also draw the tree (sizes, held-out perplexity) to FILE")
    s.set_defaults(fn=cmd_generations)
    s = sub.add_parser("eval", help="held-out loss of a generation dir or a lineage's live model")
    s.add_argument("target")
    s.add_argument("--data", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)
    s = sub.add_parser("reduce", help="ask the running daemon to reduce a lineage now")
    s.add_argument("--lineage", required=True)
    s.set_defaults(fn=cmd_reduce)
    s = sub.add_parser("fork", help="start a successor lineage from a precursor generation")
    s.add_argument("--from", dest="source", required=True)
    s.add_argument("--to", required=True)
    s.set_defaults(fn=cmd_fork)
    s = sub.add_parser("export", help="write a generation as one GGUF file for llama.cpp")
    s.add_argument("generation", metavar="LINEAGE/gen-NNNN")
    s.add_argument("--format", default="gguf", help="gguf")
    s.add_argument("--type", default="q8_0", help="f16, q8_0 (default), bf16, f32 or q4_0")
    s.add_argument("--out", metavar="FILE", help="default: ./<lineage>-gen-NNNN.<type>.gguf")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("serve", help="the OpenAI-compatible API alone (no learning), following the registry")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("edge", help="a small device: the lineage's GGUF export in llama.cpp, feedback sent back")
    s.add_argument("--api", required=True, metavar="URL", help="the daemon's serving API, e.g. http://host:8000")
    s.add_argument("--lineage", default="main")
    s.add_argument("--type", default="q8_0", help="which export to follow (default q8_0)")
    s.add_argument("--home", default=".cascade-edge", help="models and the outbox (default ./.cascade-edge)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--threads", type=positive_int, default=2, help="llama.cpp threads")
    s.add_argument("--poll", type=positive_float, default=30.0, metavar="S", help="seconds between export checks")
    s.add_argument("--flush", type=positive_float, default=5.0, metavar="S", help="seconds between sends")
    s.add_argument("--api-key", help="bearer token for the daemon's API (also CASCADE_EDGE_API_KEY)")
    s.set_defaults(fn=cmd_edge)
    for name in ("pause", "resume"):
        s = sub.add_parser(name, help=f"{name} learning in the running daemon")
        s.set_defaults(fn=cmd_simple_control)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        setup_logging(settings, logging.INFO if args.cmd in ("run", "demo", "serve", "edge") else logging.WARNING)
        return args.fn(args, settings)
    except (SettingsError, CliError, RegistryError, StartupError) as e:
        print(f"cascade: {e}", file=sys.stderr)
        return 2 if isinstance(e, SettingsError) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one sentence for the operator, not a traceback
        import redis

        if isinstance(e, redis.ConnectionError):
            print(f"cascade: cannot reach Redis: {e}", file=sys.stderr)
        else:
            print(f"cascade: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
