"""A single-use worker: forked by the zygote, serves exactly one request, exits.

The zygote (workers/zygote.py) has already closed the supervisor's
descriptors, warmed the TLS engine and dropped privileges; the fork leaves
this process with one descriptor of its own, its channel to the supervisor.
`Worker.run`, in order:
  1. installs its seccomp filter (workers/seccomp.py), then sends `ready`
     (pid, generation);
  2. waits for one `handshake` message with the accepted socket (SCM_RIGHTS);
     EOF instead means the supervisor let it go (a stop, a reload, or the
     supervisor is gone), and it exits 0;
  3. runs the handshake (workers/handshake.py), reports the result, exits.

Because no process serves two requests, nothing one request brought into a
worker (key material read through the supervisor, peer certificates, session
secrets) can reach another request: later workers are forked from the zygote,
which never sees any of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from tlshd import ipc
from tlshd.log import log
from tlshd.params import Engine
from tlshd.proctitle import set_title

from . import WORKER_BOOT_ERROR
from .handshake import HandshakeJob
from .seccomp import SeccompError, install_worker_filter


class Worker:
    def __init__(
        self,
        channel: socket.socket,
        generation: Any,
        engine: Engine,
        install_ktls: Callable[[socket.socket, bytes, bytes], None] | None = None,
        threaded: bool = False,
    ) -> None:
        self.channel = channel
        # A thread of a worker host (workers/host.py): the process title and
        # the seccomp filter's pid are the host's.
        self.threaded = threaded
        self.generation = generation
        self.engine = engine
        self.install_ktls = install_ktls

    def run(self) -> int:
        """The worker's whole life; the exit status."""
        self.channel.setblocking(True)
        if not self.threaded:
            set_title("tlshd: worker idle")
        try:
            # Before any peer data (workers/seccomp.py): the accepted socket
            # arrives only after `ready`.
            install_worker_filter()
        except SeccompError as err:
            log.error("worker %d: %s", os.getpid(), err)
            return WORKER_BOOT_ERROR
        try:
            ipc.send_message(
                self.channel,
                {"op": "ready", "pid": os.getpid(), "generation": self.generation.number},
            )
            message, fds = ipc.recv_message(self.channel, ipc.SUPERVISOR_OPS)
        except ConnectionError:
            return 0  # let go before it said `ready`
        except (ipc.IpcError, OSError) as err:
            log.error("worker %d: bad message from the supervisor: %s", os.getpid(), err)
            return 1
        if message is None:
            return 0  # EOF: not needed any more
        if message["op"] != "handshake" or len(fds) != 1:
            log.error("worker %d: unexpected %r with %d fds", os.getpid(), message["op"], len(fds))
            for fd in fds:
                os.close(fd)
            return 1
        HandshakeJob(
            self.channel,
            message,
            fds[0],
            self.generation,
            self.engine,
            self.install_ktls,
            threaded=self.threaded,
        ).run()
        return 0
