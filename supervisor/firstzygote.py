"""The first zygote, forked before the supervisor has imported its own loop.

The zygote's start-up is the longest part of the time to READY: importing
pyOpenSSL and cryptography, parsing the PEM files, one warm-up handshake
(1.7-2.2 s in the TCG lab guest; benchmarks/README.md).  None of it needs the
supervisor's loop, netlink code, status server or key service, whose imports
took another 0.45 s before the zygote was forked.  So the command line forks
the first zygote as soon as the configuration is loaded and its PEM files are
read, and only then imports the arbiter: the two start-ups overlap on two CPUs.

What the zygote inherits is therefore only what exists at that point: the
logging set-up, the configuration and the PEM bytes.  The supervisor has not
yet probed the kernel's kTLS (supervisor/tlsmodule.py), so this zygote probes
it itself while it is still root (`prepare_kernel`); zygotes forked later by
the arbiter inherit the supervisor's answer as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from tlshd.workers.zygote import Zygote

from tlshd.config import Config
from tlshd.params import Engine
from tlshd.pemfiles import CredentialFiles, read_credential_files

from .pool import Generation, WorkerPool, ZygoteHandle


@dataclass
class FirstZygote:
    """A pool holding the forked first zygote, and the generation it serves
    (without a key service: that is the supervisor's, and built later)."""

    pool: WorkerPool
    generation: Generation
    zygote: ZygoteHandle

    def abandon(self) -> None:
        """Kill and reap the zygote: the supervisor could not be started."""
        self.zygote.close_channel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.zygote.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.zygote.pid, 0)


def fork_first_zygote(
    config: Config,
    *,
    files: CredentialFiles | None = None,
    engine: Engine | None = None,
    install_ktls: Callable[..., None] | None = None,
    prepare_kernel: Callable[[], object] | None = None,
) -> FirstZygote:
    """Read the PEM files (unless `files` is given) and fork the zygote of
    generation 1.  CredentialsError (a file that cannot be read) and OSError
    (no fork) go to the caller, who stops with an error before anything runs.
    `engine`/`install_ktls` replace the real ones in tests."""
    if files is None:
        files = read_credential_files(config)
    generation = Generation(1, config, None, None, files=files)
    pool = WorkerPool()

    def build(channel: socket.socket) -> Zygote:
        return Zygote(
            channel, generation, engine, install_ktls=install_ktls, prepare_kernel=prepare_kernel
        )

    zygote = pool.spawn_zygote(generation.number, build)
    return FirstZygote(pool, generation, zygote)
