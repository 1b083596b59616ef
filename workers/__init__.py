"""Workers: unprivileged processes that each run exactly one TLS handshake,
forked on request by a per-generation zygote (workers/zygote.py)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from tlshd.params import HandshakeParams, HandshakeResult

# The handshake engine's signature (workers/engine.py's perform_handshake; the
# tests inject fakes): (accepted socket, ACCEPT parameters, HandshakeContext).
Engine = Callable[[socket.socket, HandshakeParams, Any], HandshakeResult]

# Reserved exit status of a zygote or worker that could not start (e.g. the
# unprivileged user does not exist).  The one definition: the supervisor halts
# on it instead of respawning forever; a death by signal is never a boot error.
WORKER_BOOT_ERROR = 3
