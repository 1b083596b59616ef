"""Configuration: upstream's tlshd.conf(5) keys plus our own sections.

TO BE COMPLETED (helper "config"): parsing, validation, check_config.
The dataclasses below are the contract other modules rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LEGACY_CONFIG_PATH = "/etc/tlshd.conf"
CONFIG_PATH = "/etc/tlshd/config"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class RoleConfig:
    """`[authenticate.client]` or `[authenticate.server]`."""

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    pq_certificate: str | None = None
    pq_private_key: str | None = None


@dataclass(frozen=True)
class PoolConfig:
    """`[pool]` (ours)."""

    min_workers: int = 2
    max_workers: int = 16
    max_handshakes: int = 200  # recycle a worker after this many handshakes
    max_rss_mib: int = 256  # recycle a worker whose RSS passes this


@dataclass(frozen=True)
class WorkerConfig:
    """`[worker]` (ours)."""

    user: str = "nobody"
    drop_privileges: bool = True
    # Deadline when ACCEPT carries no TIMEOUT.  nfsd gives up after 5 s
    # (SVC_HANDSHAKE_TO), so stay inside it.
    handshake_timeout_ms: int = 4000


@dataclass(frozen=True)
class Config:
    path: str | None = None
    loglevel: int = 0
    tls_debug: int = 0
    nl_debug: int = 0
    delay_done: int = 0
    keyrings: tuple[str, ...] = ()
    client: RoleConfig = field(default_factory=RoleConfig)
    server: RoleConfig = field(default_factory=RoleConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    status_socket: str = "/run/tlshd/status.sock"
    warnings: tuple[str, ...] = ()
