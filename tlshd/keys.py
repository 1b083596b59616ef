"""The key service seen by a worker.

Workers hold no privilege and cannot read kernel keys themselves, so every
keyring operation a handshake needs is a request to the supervisor.  The TLS
engine only sees this protocol; the worker implements it over the
supervisor-worker channel (tlshd.ipc), tests implement it in memory, and the
supervisor answers it with tlshd.keyring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class KeyServiceError(Exception):
    """A key could not be read or found; `errno` is the status to report."""

    def __init__(self, message: str, errno_value: int) -> None:
        super().__init__(message)
        self.errno = errno_value


@dataclass(frozen=True)
class KeyMaterial:
    serial: int
    description: str  # the text after the last ';' of keyctl_describe
    payload: bytes


class KeyService(Protocol):
    def read_key(self, serial: int) -> KeyMaterial:
        """Read a key by serial (payload and description). Raises KeyServiceError."""
        ...

    def search_psks(self, identities: Sequence[str], keyring: int | None) -> KeyMaterial | None:
        """The key of type "psk" described by the first of `identities` (those a
        peer's ClientHello offered, in order) found in the keyrings the daemon
        serves (.nvme, .nfs, .nfsd, configured ones, plus `keyring` from ACCEPT).
        None if there is none.  Asked at most once per handshake."""
        ...

    def add_peer_certificate(self, der: bytes, description: str) -> int:
        """Add a peer certificate as an "asymmetric" key; the serial, or 0."""
        ...
