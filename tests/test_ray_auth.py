"""The daemon's own local Ray requires a token: an unauthenticated client is refused, actors still work."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import DaemonProcess, settings_env, wait_drained
from tests.redis_servers import RedisServer, needs_redis_server
from tests.test_daemon_e2e import GROUP, STREAM, interaction

# A bare GCS client (Ray's own) asking the daemon's Ray for one key; prints ACCEPTED or REFUSED <error>.
PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"cascade-probe", None, timeout=10)
except Exception as e:
    print("REFUSED", type(e).__name__, str(e).splitlines()[0])
else:
    print("ACCEPTED")
"""
STARTED = re.compile(r"local Ray started on (\S+) with token authentication")


def daemon_env(home: Path, tiny_model: Path, redis_url: str, **ray_env: str) -> dict[str, str]:
    env = {k: v for k, v in settings_env(home, tiny_model, redis_url).items() if not k.startswith("RAY_AUTH")}
    return {**env, **ray_env}


def gcs_address(d: DaemonProcess) -> str:
    found = STARTED.search(d.log.read_text())
    assert found, d.log.read_text()[-3000:]
    return found.group(1)


def probe(gcs: str, home: Path, **ray_env: str) -> str:
    """What the daemon's Ray answers a client with ``ray_env`` (and no token file in its HOME)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **ray_env}
    out = subprocess.run([sys.executable, "-c", PROBE, gcs], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr[-2000:]
    return lines[-1]


@needs_redis_server
def test_local_ray_refuses_clients_without_the_token_and_its_actors_still_learn(tmp_path, tiny_model, daemon_factory):
    with RedisServer(tmp_path / "redis") as server:
        home = tmp_path / "home"
        # A stray RAY_ADDRESS (like a `ray start` cluster on the machine) is not joined: the daemon starts its own.
        d = daemon_factory(daemon_env(home, tiny_model, server.url, RAY_ADDRESS="127.0.0.1:1"))
        d.wait_healthy()
        gcs = gcs_address(d)
        assert gcs.startswith("127.0.0.1:") and gcs != "127.0.0.1:1"
        no_token = probe(gcs, tmp_path, RAY_AUTH_MODE="disabled")
        assert no_token.startswith("REFUSED AuthenticationError") and "InvalidAuthToken" in no_token, no_token
        wrong = probe(gcs, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
        assert wrong.startswith("REFUSED AuthenticationError") and "InvalidAuthToken" in wrong, wrong

        r = server.client()
        for i in range(16):
            r.xadd(STREAM, interaction(i))
        wait_drained(r, STREAM, GROUP, proc=d)
        state = json.loads((home / "registry/main/live/state.json").read_text())
        assert state["interactions_learned"] > 0
        assert d.terminate() == 0


@needs_redis_server
def test_an_operator_token_is_kept_and_admits_its_holder(tmp_path, tiny_model, daemon_factory):
    token = "cafe" * 16
    with RedisServer(tmp_path / "redis") as server:
        d = daemon_factory(daemon_env(tmp_path / "home", tiny_model, server.url, RAY_AUTH_MODE="token",
                                      RAY_AUTH_TOKEN=token))
        d.wait_healthy()
        gcs = gcs_address(d)
        assert probe(gcs, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) == "ACCEPTED"
        assert probe(gcs, tmp_path, RAY_AUTH_MODE="disabled").startswith("REFUSED AuthenticationError")
        assert d.terminate() == 0
