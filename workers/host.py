"""A worker host: one process that serves several handshakes, each in a thread.

This is the alternative that issue 10 asks to be measured where single-use
workers miss its targets ("a few workers, each driving several handshakes at
once"): `[pool] handshakes_per_worker` above 1.  The default stays one
process per handshake (workers/base.py).

The zygote forks a host and keeps a control channel to it.  For each worker
the supervisor asks for, the zygote sends the worker's channel to a host
(`slot`); the host runs a `Worker` on it in a thread of its own, exactly as a
single-use worker runs, and the supervisor sees a worker whose pid is the
host's.  A host gets `handshakes_per_worker` channels in its life, then its
control channel is closed and it exits once its threads are done: it serves
no more requests than that, and what they left in its memory goes with it.

What is shared, and what that costs:
* one fork, one exit and one set of copy-on-write faults for several
  handshakes: the single-use worker's overhead (benchmarks/README.md);
* the address space: session secrets of co-hosted handshakes live in one
  process.  Requests that need a private key or a PSK from the kernel's
  keyrings are therefore never given to a host (supervisor/broker.py gives
  them a single-use worker), so no key read for one request is ever in a
  process that serves another;
* the fate: a handshake that overruns its deadline is ended with SIGKILL,
  which ends its co-hosted handshakes too (DONE(EIO) for each);
* the seccomp filter is per thread (prctl(PR_SET_SECCOMP) confines the
  calling thread): each handshake thread installs it before it reads its
  socket; the host's main thread, which only reads the zygote's control
  channel, is not confined, and a thread taken over by a peer shares its
  memory.  A single-use worker has no such neighbour.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from tlshd import ipc
from tlshd.log import log
from tlshd.params import Engine
from tlshd.proctitle import set_title

from . import WORKER_BOOT_ERROR
from .base import Worker

HOST_OPS = frozenset({"slot"})


class WorkerHost:
    def __init__(
        self,
        control: socket.socket,
        generation: Any,
        engine: Engine,
        install_ktls: Callable[[socket.socket, bytes, bytes], None] | None = None,
    ) -> None:
        self.control = control
        self.generation = generation
        self.engine = engine
        self.install_ktls = install_ktls
        self.threads: list[threading.Thread] = []

    def run(self) -> int:
        """Start a worker thread per `slot` until EOF, then wait for them all."""
        set_title("tlshd: worker host")
        self.control.setblocking(True)
        while True:
            try:
                message, fds = ipc.recv_message(self.control, HOST_OPS)
            except (ipc.IpcError, OSError) as err:
                log.error("worker host %d: bad message from the zygote: %s", os.getpid(), err)
                break
            if message is None:
                break
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                log.error("worker host %d: a slot without its channel", os.getpid())
                break
            thread = threading.Thread(target=self.serve_slot, args=(fds[0],), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.control.close()
        for thread in self.threads:
            thread.join()
        return 0

    def serve_slot(self, channel_fd: int) -> None:
        channel = socket.socket(fileno=channel_fd)
        code = 0
        try:
            code = Worker(
                channel, self.generation, self.engine, self.install_ktls, threaded=True
            ).run()
        except BaseException:
            with contextlib.suppress(BaseException):
                log.exception("worker host %d: a worker thread crashed", os.getpid())
        finally:
            channel.close()
        if code == WORKER_BOOT_ERROR:
            # As a single-use worker would: its exit status tells the
            # supervisor that workers cannot start here (no seccomp filter),
            # rather than a thread that fails again for every request.
            os._exit(WORKER_BOOT_ERROR)
