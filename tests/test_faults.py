"""Faults injected into a running daemon: Redis going away and coming back."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import redis

from tests.conftest import free_port, settings_env, wait_drained
from tests.test_daemon_e2e import GROUP, STREAM, interaction


class RedisServer:
    """A redis-server of the test's own (append-only, so a restart keeps the stream and the group)."""

    def __init__(self, workdir, port: int) -> None:
        self.dir, self.port = workdir, port
        self.proc = None

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                                      "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                r.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_redis_outage_is_reported_and_survived_without_loss(tmp_path, tiny_model, daemon_factory):
    port = free_port()
    server = RedisServer(tmp_path, port).start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        home = tmp_path / "home"
        d = daemon_factory(settings_env(home, tiny_model, url))
        d.wait_healthy()
        r = redis.Redis(port=port)
        for i in range(40):
            r.xadd(STREAM, interaction(i))
        wait_drained(r, STREAM, GROUP, proc=d)

        server.stop()
        deadline = time.monotonic() + 30
        while health(d.port) != 503:
            assert time.monotonic() < deadline, "/healthz never reported the outage"
            time.sleep(0.5)
        # The daemon rides the outage out: it keeps polling (each failed read is logged) and stays up.
        deadline = time.monotonic() + 60
        while d.log.read_text().count("reading the stream failed") < 3:
            assert d.proc.poll() is None, "the daemon died with Redis"
            assert time.monotonic() < deadline, "the daemon stopped polling while Redis was down"
            time.sleep(0.5)
        assert d.proc.poll() is None and health(d.port) == 503

        server.start()
        for i in range(40, 80):
            r.xadd(STREAM, interaction(i))
        wait_drained(r, STREAM, GROUP, proc=d)
        deadline = time.monotonic() + 30
        while health(d.port) != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        state = json.loads((home / "registry/main/live/state.json").read_text())
        heldout = sum(len(v) for v in json.loads((home / "registry/main/live/heldout.json").read_text()).values())
        assert state["interactions_learned"] + heldout == 80
        assert d.terminate() == 0
    finally:
        server.stop()
