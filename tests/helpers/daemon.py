"""Run a real Arbiter in a forked child against the fake kernel.

The arbiter must own the main thread of its process (signal handlers), so
each test forks one: the child builds the Arbiter from objects made in the
test process (the FakeKernel's netlink transports survive fork) and exits with
`run()`'s return value.  Workers are forked from that child, as in production.
The test process stays the fake kernel and the peer, and sends real signals.

The test process is made a child subreaper, so a worker the daemon failed to
reap would be reparented here as a visible zombie instead of vanishing into
init: `assert_reaped` can tell.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.fakekernel import FakeKernel, fake_install_ktls, fake_ktls_state
from tlshd.config import load_config
from tlshd.credentials import Credentials
from tlshd.params import HandshakeResult
from tlshd.statusclient import StatusError, fetch_status

PR_SET_CHILD_SUBREAPER = 36
WAIT_S = 20.0


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def short_tmpdir() -> Path:
    """AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="tlshd-t-", dir="/tmp"))


def config_text(
    status_socket: Path,
    min_workers: int = 1,
    max_workers: int = 4,
    timeout_ms: int = 4000,
    extra: str = "",
    drop_privileges: bool = True,
    user: str = "nobody",
    handshakes_per_worker: int = 1,
) -> str:
    return (
        "[debug]\nloglevel=1\n"
        f"[pool]\nmin_workers={min_workers}\nmax_workers={max_workers}\n"
        f"handshakes_per_worker={handshakes_per_worker}\n"
        f"[worker]\nhandshake_timeout_ms={timeout_ms}\n"
        + (f"user={user}\n" if user else "")  # "": the default account
        + f"drop_privileges={'true' if drop_privileges else 'false'}\n"
        f"[status]\nsocket={status_socket}\n{extra}"
    )


class NullKeyService:
    """Answers every key request with ENOKEY."""

    def answer(self, scope: Any, request: Any) -> Any:
        from tlshd.ipc import KeyReply

        return KeyReply.failure(126)


@dataclass
class Daemon:
    pid: int
    directory: Path
    config_path: Path
    status_path: Path
    log_path: Path
    exit_code: int | None = None
    worker_pids_seen: set[int] = field(default_factory=set)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = WAIT_S) -> int:
        end = time.monotonic() + timeout
        while self.exit_code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > end:
                raise TimeoutError(f"daemon {self.pid} did not exit\n{self.log()}")
            time.sleep(0.02)
        return self.exit_code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        document = fetch_status(str(self.status_path))
        self.worker_pids_seen.update(w["pid"] for w in document["workers"] if w["pid"])
        return document

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = WAIT_S,
        what: str = "condition",
    ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        document: dict[str, Any] = {}
        while time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError, StatusError):
                document = self.status()
                if predicate(document):
                    return document
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached; last status {document}\n{self.log()}")

    def wait_for_log(self, text: str, timeout: float = WAIT_S) -> None:
        end = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > end:
                raise TimeoutError(f"{text!r} not logged\n{self.log()}")
            time.sleep(0.05)

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        # Captured by pytest and shown only when the test fails.
        print(f"--- daemon {self.pid} log ---\n{self.log()}")
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                self.wait(5)
        for pid in self.worker_pids_seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def assert_reaped(self, pids: set[int]) -> None:
        """With the test as subreaper, an unreaped worker would be our zombie."""
        leftovers = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                leftovers.append((pid, proc.status(), proc.ppid()))
        assert not leftovers, f"workers not reaped: {leftovers}\n{self.log()}"


def _child_logging(log_path: Path) -> None:
    from tlshd.log import log

    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(process)d %(levelname)s %(message)s"))
    log.addHandler(handler)


def start_daemon(
    kernel: FakeKernel,
    engine: Callable[..., HandshakeResult],
    *,
    config: str | None = None,
    directory: Path | None = None,
    keyservice: Any = None,
    environ: dict[str, str] | None = None,
    wait_ready: bool = True,
    credentials: Credentials | None = None,
    read_pem_files: bool = False,
    in_child: Callable[[], None] | None = None,
    first_zygote: bool = False,
    zygote_prepare_kernel: Callable[[], object] | None = None,
    **arbiter_kwargs: Any,
) -> Daemon:
    """Fork a daemon; `in_child` runs in it before the Arbiter is built.

    `read_pem_files`: start as production does, the supervisor reading the
    config's PEM files and the zygote parsing them (`credentials` unused).
    `first_zygote`: also fork the zygote before the Arbiter is built, as the
    command line does (supervisor/firstzygote.py); implies `read_pem_files`."""
    directory = directory or short_tmpdir()
    status_path = directory / "status.sock"
    config_path = directory / "tlshd.conf"
    if not config_path.exists():
        config_path.write_text(config or config_text(status_path))
    log_path = directory / "daemon.log"
    loaded = load_config(str(config_path))
    # kTLS as the fake kernel emulates it (tests/fakekernel.py)
    arbiter_kwargs.setdefault("install_ktls", fake_install_ktls)
    arbiter_kwargs.setdefault("ktls_state", fake_ktls_state)
    netlink = kernel.make_netlink()
    become_subreaper()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the daemon process
        code = 99
        try:
            _child_logging(log_path)
            os.environ.pop("NOTIFY_SOCKET", None)
            os.environ.update(environ or {})
            if in_child is not None:
                in_child()
            if first_zygote:
                from tlshd.supervisor.firstzygote import fork_first_zygote

                arbiter_kwargs["first_zygote"] = fork_first_zygote(
                    loaded,
                    engine=engine,
                    install_ktls=arbiter_kwargs["install_ktls"],
                    prepare_kernel=zygote_prepare_kernel,
                )
                read_pem_files = True
            from tlshd.supervisor.arbiter import Arbiter

            arbiter = Arbiter(
                str(config_path),
                loaded,
                netlink=netlink,
                credentials=None if read_pem_files else (credentials or Credentials()),
                keyservice=keyservice or NullKeyService(),
                engine=engine,
                **arbiter_kwargs,
            )
            code = arbiter.run()
        except BaseException:
            with contextlib.suppress(BaseException), open(log_path, "a") as f:
                f.write(traceback.format_exc())
        finally:
            os._exit(code)
    daemon = Daemon(pid, directory, config_path, status_path, log_path)
    if wait_ready:
        try:
            kernel.wait_for_listener(WAIT_S)
            min_workers = loaded.pool.min_workers
            daemon.wait_for(
                lambda d: (
                    sum(w["state"] == "idle" and bool(w["pid"]) for w in d["workers"])
                    >= min_workers
                ),
                what="min workers idle",
            )
        except BaseException:
            daemon.stop()
            raise
    return daemon


@contextlib.contextmanager
def running_daemon(
    kernel: FakeKernel, engine: Callable[..., HandshakeResult], **kwargs: Any
) -> Iterator[Daemon]:
    daemon = start_daemon(kernel, engine, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(client, server) ends of an ESTABLISHED loopback TCP connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def recv_exactly(sock: socket.socket, size: int, timeout: float = WAIT_S) -> bytes:
    data = b""
    end = time.monotonic() + timeout
    while len(data) < size:
        remaining = end - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            raise TimeoutError(f"got {data!r} of {size} bytes")
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {data!r}")
        data += chunk
    return data
