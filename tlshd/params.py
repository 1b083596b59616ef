"""Per-request data that crosses process boundaries.

`HandshakeParams` is what the kernel said in its ACCEPT reply; `HandshakeResult`
is what goes back in DONE.  Both are plain, immutable and serialisable to a dict
of JSON types so that the supervisor-worker channel never pickles anything.
Results default to failure (EIO): a path that forgets to set a status fails
closed, as upstream's tlshd_default_handshake_parms does.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tlshd.uapi import AuthMode, MsgType


@dataclass(frozen=True)
class HandshakeParams:
    """The parsed ACCEPT reply.  `sockfd` is the fd number in the accepting process."""

    sockfd: int
    message_type: int = MsgType.UNSPEC
    auth_mode: int = AuthMode.UNSPEC
    timeout_ms: int | None = None
    peername: str | None = None
    keyring: int | None = None
    peer_identities: tuple[int, ...] = ()
    cert_serial: int = 0
    privkey_serial: int = 0

    def to_wire(self) -> dict[str, Any]:
        # Flat fields only: no deep copy (dataclasses.asdict was a tenth of the
        # supervisor's CPU per request, benchmarks/supervisor_profile.py).
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["peer_identities"] = list(self.peer_identities)
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> HandshakeParams:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["peer_identities"] = tuple(int(x) for x in known.get("peer_identities", ()))
        return cls(**known)


@dataclass(frozen=True)
class HandshakeResult:
    """What the worker reports and the supervisor turns into DONE."""

    status: int = errno.EIO
    remote_auth: tuple[int, ...] = ()
    cipher: str | None = None
    detail: str = ""
    group: str | None = None  # the key exchange group, e.g. X25519MLKEM768 (logged)

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        data["remote_auth"] = list(self.remote_auth)
        return data


def role_name(message_type: int) -> str:
    """ "clienthello"/"serverhello": the role of a request in logs, titles and status."""
    try:
        return MsgType(message_type).name.lower()
    except ValueError:
        return f"type{message_type}"


# A handshake engine, as the worker calls it: (socket, ACCEPT parameters,
# workers.engine.HandshakeContext) -> result.  The real one is
# tlshd.workers.engine.perform_handshake; tests pass fakes.
Engine = Callable[[socket.socket, HandshakeParams, Any], HandshakeResult]
