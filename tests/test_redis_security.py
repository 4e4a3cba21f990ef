"""The daemon against Redis servers of the test's own: with a password, TLS-only, and wrong credentials."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from daemon.config import SettingsError, load_settings
from tests.conftest import DaemonProcess, settings_env, wait_drained
from tests.redis_servers import RedisServer, TlsUnsupported, make_tls_files, needs_redis_server
from tests.test_daemon_e2e import GROUP, STREAM, interaction

PASSWORD = "s3cret/pass:w@rd"  # characters that must be percent-encoded in the URL


def learns_through(server: RedisServer, home: Path, tiny_model: Path, daemon_factory, n: int = 24) -> None:
    """Start ``cascade run`` on ``server.url``, publish ``n`` interactions, and check every one is handled."""
    d = daemon_factory(settings_env(home, tiny_model, server.url))
    d.wait_healthy()
    r = server.client()
    for i in range(n):
        r.xadd(STREAM, interaction(i))
    wait_drained(r, STREAM, GROUP, proc=d)
    state = json.loads((home / "registry/main/live/state.json").read_text())
    heldout = sum(len(v) for v in json.loads((home / "registry/main/live/heldout.json").read_text()).values())
    assert state["interactions_learned"] + heldout == n
    assert state["interactions_learned"] > 0
    assert d.terminate() == 0


def failed_start(d: DaemonProcess) -> str:
    """The last line a daemon that must not start printed, after checking it exited with 1."""
    assert d.proc.wait(timeout=120) == 1, d.log.read_text()[-3000:]
    return d.log.read_text().strip().splitlines()[-1]


@needs_redis_server
def test_daemon_learns_through_a_password_protected_redis(tmp_path, tiny_model, daemon_factory):
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()  # the server really wants the password
        learns_through(server, tmp_path / "home", tiny_model, daemon_factory)


@needs_redis_server
@pytest.mark.parametrize("auth", ["wrong-password", None])
def test_wrong_or_missing_redis_password_stops_the_daemon_with_one_clear_sentence(tmp_path, tiny_model,
                                                                                 daemon_factory, auth):
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        url = f"redis://{f':{auth}@' if auth else ''}127.0.0.1:{server.port}/0"
        line = failed_start(daemon_factory(settings_env(tmp_path / "home", tiny_model, url)))
        assert line.startswith("cascade: ") and "refused the credentials in CASCADE_REDIS_URL" in line, line
        assert "wrong-password" not in line  # the password is never echoed
        if auth:
            assert f"redis://***@127.0.0.1:{server.port}/0" in line
        assert server.client().xlen(STREAM) == 0


def tls_server(tmp_path: Path, password: str | None = None) -> RedisServer:
    try:
        return RedisServer(tmp_path / "redis", password=password, tls=make_tls_files(tmp_path / "tls")).start()
    except TlsUnsupported as e:
        pytest.skip(str(e))


@needs_redis_server
def test_daemon_learns_through_a_tls_only_redis_with_a_password(tmp_path, tiny_model, daemon_factory):
    server = tls_server(tmp_path, PASSWORD)
    try:
        assert server.url.startswith("rediss://") and "ssl_ca_certs=" in server.url
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=server.port, password=PASSWORD, socket_timeout=5).ping()  # no plaintext
        learns_through(server, tmp_path / "home", tiny_model, daemon_factory)
    finally:
        server.stop()


@needs_redis_server
def test_a_tls_redis_whose_certificate_is_not_trusted_stops_the_daemon(tmp_path, tiny_model, daemon_factory):
    server = tls_server(tmp_path)
    try:
        url = f"rediss://127.0.0.1:{server.port}/0"  # no ssl_ca_certs: the self-made CA is not trusted
        line = failed_start(daemon_factory(settings_env(tmp_path / "home", tiny_model, url)))
        assert line.startswith("cascade: cannot reach Redis") and "CERTIFICATE_VERIFY_FAILED" in line, line
    finally:
        server.stop()


def test_a_bad_redis_url_is_reported_without_its_password(monkeypatch):
    monkeypatch.setenv("CASCADE_REDIS_URL", f"http://:{PASSWORD}@127.0.0.1:6379/0")
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert "CASCADE_REDIS_URL" in str(e.value) and "http://***@127.0.0.1:6379/0" in str(e.value)
    assert PASSWORD not in str(e.value)
