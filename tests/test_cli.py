"""The ``cascade`` command as an operator uses it (subprocesses, real Redis, a registry on disk)."""
from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys

import redis

from daemon.config import load_settings
from daemon.foundation import ensure_foundation
from daemon.lineage import LineageWorker
from daemon.registry import Registry
from daemon.schema import Interaction
from tests.conftest import settings_env


def cascade(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_publish_jsonl_with_text_and_pairs(tmp_path, tiny_model, redis_url):
    env = settings_env(tmp_path / "home", tiny_model, redis_url)
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b", "meta": {"domain": "x"}, "reward": 0.5}) + "\n\n"
                 + json.dumps({"text": "just text"}) + "\n")
    out = cascade(env, "publish", str(f), "--lineage", "law")
    assert out.returncode == 0, out.stderr
    entries = redis.Redis.from_url(redis_url).xrange("cascade:interactions")
    assert [e[1] for e in entries] == [
        {b"prompt": b"a", b"response": b"b", b"meta": b'{"domain": "x"}', b"reward": b"0.5", b"lineage": b"law"},
        {b"prompt": b"", b"response": b"just text", b"lineage": b"law"},
    ]


def test_publish_refuses_a_bad_file_whole_with_one_sentence(tmp_path, tiny_model, redis_url):
    env = settings_env(tmp_path / "home", tiny_model, redis_url)
    f = tmp_path / "bad.jsonl"
    f.write_text('{"response": "ok"}\n{"response": 3\n')
    out = cascade(env, "publish", str(f))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "bad.jsonl:2" in out.stderr
    assert redis.Redis.from_url(redis_url).xlen("cascade:interactions") == 0
    out = cascade(env, "publish", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_status_generations_eval_and_fork_offline(tmp_path, tiny_model, redis_url):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, heal_steps=1, reduce_budget=10)
    s = load_settings(home=home, base_model=tiny_model, max_seq_len=32, heal_steps=1, reduce_budget=10.0,
                      learning_rate=3e-3)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn([Interaction(entry_id=f"{i}-0", id=str(i), prompt=f"Q{i}", response=f" answer {i % 2}") for i in range(1, 25)])
    assert w.reduce().outcome == "promoted"
    w.close()

    st = json.loads(cascade(env, "status", "--json").stdout)
    assert st["lineages"][0]["generation"] == "gen-0001" and st["daemon_running"] is False
    assert "lag" in st and "pending" in st
    txt = cascade(env, "status").stdout
    assert "gen-0001" in txt and "lag 0" in txt and "reducing" not in txt
    w = LineageWorker(s, "main")
    snap = w.snapshot("command")  # a reduction in the background: the reducer has the snapshot
    w.close()
    st = json.loads(cascade(env, "status", "--json").stdout)
    assert st["lineages"][0]["reducing"]["id"] == snap.id
    assert f"reducing gen-0001 in the background (command, snapshot {snap.id}" in cascade(env, "status").stdout

    out = cascade(env, "fork", "--from", "main/gen-0001", "--to", "niche")
    assert out.returncode == 0, out.stderr
    tree = json.loads(cascade(env, "generations", "--json").stdout)["generations"]
    by_id = {n["id"]: n for n in tree}
    assert by_id["main/gen-0001"]["parent"] == "main/gen-0000"
    assert by_id["niche/gen-0000"]["parent"] == "main/gen-0001"
    assert by_id["niche/gen-0000"]["n_params"] == by_id["main/gen-0001"]["n_params"]
    text = cascade(env, "generations", "--png", str(tmp_path / "tree.png")).stdout
    assert "main/gen-0000" in text and "└── main/gen-0001" in text and "niche/gen-0000" in text
    assert (tmp_path / "tree.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Q", "response": f" answer {i % 2}"}) + "\n" for i in range(6)))
    by_dir = json.loads(cascade(env, "eval", str(home / "registry/main/gen-0001"), "--data", str(data), "--json").stdout)
    by_lineage = json.loads(cascade(env, "eval", "main", "--data", str(data), "--json").stdout)
    assert by_dir["records"] == 6 and by_dir["perplexity"] > 1
    assert by_lineage["adapter"] is not None and by_lineage["loss"] > 0

    for args, needle in [(("fork", "--from", "main/gen-0009", "--to", "x"), "does not exist"),
                         (("fork", "--from", "main/gen-0001", "--to", "../up"), "invalid lineage"),
                         (("eval", "nope", "--data", str(data)), "neither"),
                         (("reduce", "--lineage", "ghost"), "does not exist")]:
        out = cascade(env, *args)
        assert out.returncode == 1 and needle in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_status_watch_follows_a_running_daemon_live(tmp_path, tiny_model, redis_url, daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url)
    d = daemon_factory(env)
    d.wait_healthy()
    # As from a terminal: Ctrl-C must reach it even when the test run itself was started in the background
    # (a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt).
    # --count bounds the view (360 refreshes, about three minutes): reading it ends at its last line.
    watch = subprocess.Popen([sys.executable, "-m", "daemon.cli", "status", "--watch", "--json", "--interval", "0.5",
                              "--count", "360"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = json.loads(watch.stdout.readline())
        assert first["daemon_running"] is True and first["lineages"][0]["interactions_learned"] == 0
        r = redis.Redis.from_url(redis_url)
        for i in range(16):
            r.xadd("cascade:interactions", {"prompt": f"Item {i} is", "response": f" number {i % 3}."})
        doc = first
        for line in watch.stdout:  # one document per refresh
            doc = json.loads(line)
            (main,) = doc["lineages"]
            if doc["lag"] == 0 and doc["pending"] == 0 and main["interactions_learned"] > 0:
                break
        else:
            raise AssertionError(f"status --watch never showed the entries learned: {doc}\n{d.log.read_text()[-3000:]}")
        state = json.loads((home / "registry/main/live/state.json").read_text())
        assert main["update_steps"] == state["update_steps"] > 0 and main["generation"] == "gen-0000"
    finally:
        watch.send_signal(signal.SIGINT)  # Ctrl-C is the usual way out of a live view
        _out, err = watch.communicate(timeout=60)  # drains its output while it exits
        assert watch.returncode == 0, err

    out = cascade(env, "status", "--watch", "--interval", "0.2", "--count", "3")
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # not a terminal: refreshes follow one another, no screen clearing
    refreshes = out.stdout.split("\n\n")
    assert len(refreshes) == 3
    for n, text in enumerate(refreshes, 1):
        lines = text.splitlines()
        assert f"refresh {n}, every 0.2s" in lines[0] and "lag 0  pending 0" in lines[1]
        assert "daemon running" in lines[1]
        lineage, generation, _params, steps, learned = lines[3].split()[:5]
        assert (lineage, generation) == ("main", "gen-0000")
        assert (int(steps), int(learned)) == (state["update_steps"], state["interactions_learned"])
    assert refreshes[1].splitlines()[-1] == "learned since the last refresh: main +0"


def test_status_watch_clears_a_terminal_and_checks_its_arguments(tmp_path, tiny_model, redis_url):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url)
    ensure_foundation(Registry(home / "registry").lineage("main"), tiny_model)
    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--watch", "--interval", "0.1",
                           "--count", "2"], env=env, stdout=secondary, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(secondary)
    screen = b""
    while chunk := read_pty(primary):
        screen += chunk
    os.close(primary)
    assert proc.returncode == 0, proc.stderr
    frames = screen.decode().split("\x1b[H\x1b[2J")  # each refresh clears the screen first
    assert frames[0] == "" and len(frames) == 3
    assert all("daemon stopped" in f and "main" in f and "gen-0000" in f for f in frames[1:])

    out = cascade(env, "status", "--count", "2")
    assert out.returncode == 1 and out.stderr == "cascade: --interval and --count only apply with --watch\n"
    for bad in (("--interval", "0"), ("--interval", "nan"), ("--count", "0")):
        out = cascade(env, "status", "--watch", *bad)
        assert out.returncode == 2 and bad[0] in out.stderr, out.stderr


def read_pty(fd: int) -> bytes:
    """What the process wrote to the terminal; b"" once it is gone (Linux reports EIO then)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
