"""Real Redis and ZooKeeper servers for the tests of the distributed DAS backends.

Each server runs on loopback on a free port with its data under a given directory, and can be
killed with SIGKILL and restarted on the same port and data (:meth:`restart`). The binaries come
from the Debian packages ``redis-server`` and ``zookeeper`` (ZooKeeper runs as
``java -cp /usr/share/java/zookeeper.jar ... QuorumPeerMain zoo.cfg``, as the package's
``zkServer.sh`` does). :func:`redis_available` / :func:`zookeeper_available` say why a server
cannot run here (None if it can); the fixtures in ``conftest.py`` skip then, or fail when
``EXFM_REQUIRE_SERVICES=1`` (CI).

Every server process is killed when its fixture ends, at interpreter exit (``atexit``), and, for
servers started from the main thread, by the kernel when the test process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_RUNNING: set[subprocess.Popen] = set()
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _kill_all() -> None:
    for process in list(_RUNNING):
        _kill(process)


atexit.register(_kill_all)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    _RUNNING.discard(process)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the thread that started it exits."""
    with contextlib.suppress(AttributeError):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ask(port: int, request: bytes, timeout: float = 1.0) -> bytes:
    """Send ``request`` to 127.0.0.1:port and read until the server closes or ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(4096):
                chunks.append(chunk)
                if request.startswith(b"PING") and b"\r\n" in chunk:
                    break
        return b"".join(chunks)


class Server:
    """A server process on 127.0.0.1:``port`` with its data under ``base``."""

    name = "server"

    def __init__(self, base: Path, port: int | None = None, start_timeout_s: float = 30.0):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.log_path = self.base / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers (RuntimeError with its log if it does not)."""
        if self.running:
            raise RuntimeError(f"{self.name} on port {self.port} is already running")
        main = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                preexec_fn=_die_with_parent if main else None,
            )
        _RUNNING.add(self.process)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if self.ready():
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.name} on port {self.port} did not start; its log:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server (no clean shutdown) and wait for it to exit."""
        if self.process is not None:
            _kill(self.process)

    def restart(self) -> None:
        """Start again on the same port and data (after :meth:`kill`; kills it first if running)."""
        self.kill()
        self.start()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def redis_available() -> str | None:
    """None if a Redis server and the ``redis`` package are available, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server not found (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install -e '.[test]')"
    return None


class RedisServer(Server):
    """``redis-server`` with an append-only file fsynced on every write (durable across kill -9)."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.base),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip

    def ready(self) -> bool:
        return _ask(self.port, b"PING\r\n").startswith(b"+PONG")


def zookeeper_classpath() -> str | None:
    """The ZooKeeper server's class path: ``$EXFM_ZOOKEEPER_CLASSPATH``, the Debian jar, or a tarball's jars."""
    if os.environ.get("EXFM_ZOOKEEPER_CLASSPATH"):
        return os.environ["EXFM_ZOOKEEPER_CLASSPATH"]
    debian = Path("/usr/share/java/zookeeper.jar")  # its manifest's Class-Path names the dependencies
    if debian.exists():
        return str(debian)
    for home in (os.environ.get("ZOOKEEPER_HOME"), "/usr/share/zookeeper", "/opt/zookeeper"):
        if home:
            jars = sorted(glob.glob(f"{home}/*.jar") + glob.glob(f"{home}/lib/*.jar"))
            if any("zookeeper" in Path(jar).name for jar in jars):
                return ":".join(jars)
    return None


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").exists():
        return str(Path(home, "bin", "java"))
    return shutil.which("java")


def zookeeper_available() -> str | None:
    """None if a ZooKeeper server (java and its jars) and the ``kazoo`` package are available, else why not."""
    if _java() is None:
        return "java not found (apt-get install zookeeper)"
    if zookeeper_classpath() is None:
        return "ZooKeeper jars not found (apt-get install zookeeper)"
    try:
        import kazoo  # noqa: F401
    except ImportError:
        return "the kazoo package is not installed (pip install -e '.[test]')"
    return None


class ZooKeeperServer(Server):
    """A standalone ZooKeeper server (tickTime 500 ms: session timeouts from 1 s to 30 s)."""

    name = "zookeeper"

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        config = self.base / "zoo.cfg"
        config.write_text(
            "\n".join(
                [
                    "tickTime=500",
                    f"dataDir={self.base / 'data'}",
                    f"clientPort={self.port}",
                    "clientPortAddress=127.0.0.1",
                    "minSessionTimeout=1000",
                    "maxSessionTimeout=30000",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=*",
                    "",
                ]
            )
        )
        return [
            _java() or "java",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Dzookeeper.admin.enableServer=false",
            "-cp",
            zookeeper_classpath() or "",
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(config),
        ]

    def ready(self) -> bool:
        return b"Mode: standalone" in _ask(self.port, b"srvr")


def expire_session(client: Any, hosts: str, timeout_s: float = 15.0) -> None:
    """Make the ZooKeeper server expire a kazoo client's session now, and wait for a new one.

    Another client joins the session (same id and password) and closes it, which ends it on the
    server: its ephemeral nodes go at once. The original client then reconnects with a new session.
    """
    from kazoo.client import KazooClient

    session_id, password = client.client_id
    intruder = KazooClient(hosts=hosts, client_id=(session_id, password))
    intruder.start(timeout=timeout_s)
    intruder.stop()
    intruder.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            client.exists("/")  # any request: makes the client notice and re-establish
        current = client.client_id
        if client.connected and current is not None and current[0] != session_id:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the ZooKeeper client did not get a new session within {timeout_s} s")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


class ManualClock:
    """A settable clock (for the lease expiry of the embedded backends)."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class ZeusHarness:
    """Zeus backends under one test interface: each :meth:`open` is another task's connection.

    ``sqlite``: every store shares one file and one :class:`ManualClock`; ``zookeeper``: every
    store is another client (its own session) under one fresh root. :meth:`lapse` makes the leases
    of ``store`` expire: the SQLite clock moves past every lease; the ZooKeeper session of ``store``
    is expired by the server (its ephemeral nodes go; the client reconnects with a new session).
    """

    def __init__(self, kind: str, tmp_path: Path, zookeeper: ZooKeeperServer | None = None):
        self.kind = kind
        self.tmp_path = tmp_path
        self.zookeeper = zookeeper
        self.clock = ManualClock()
        self.root = unique("/exfm-test/zeus-")
        self._opened: list[Any] = []

    def open(self, **kwargs: Any) -> Any:
        if self.kind == "sqlite":
            from exfm.das.zeus import SQLiteZeus

            return SQLiteZeus(self.tmp_path / "zeus.db", clock=self.clock, **kwargs)
        from exfm.das.zookeeper import ZooKeeperZeus

        assert self.zookeeper is not None
        store = ZooKeeperZeus(self.zookeeper.hosts, root=self.root, **kwargs)
        self._opened.append(store)
        return store

    def lapse(self, store: Any, seconds: float = 1e6) -> None:
        if self.kind == "sqlite":
            self.clock.now += seconds
        else:
            assert self.zookeeper is not None
            expire_session(store.client, self.zookeeper.hosts)

    def close(self) -> None:
        for store in self._opened:
            with contextlib.suppress(Exception):
                store.close()
        self._opened.clear()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
