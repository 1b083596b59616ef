"""Key material loaded by the supervisor before workers fork.

Private keys are root-only files (mode 0600), and workers run unprivileged,
so every file named in the config is read here, once per config generation,
and reaches the workers through fork's copy-on-write memory.

TO BE COMPLETED (helper "config"): load_credentials().
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoleCredentials:
    """PEM bytes for one role; None means "not configured"."""

    cert_chain_pem: bytes | None = None  # leaf first, then intermediates
    private_key_pem: bytes | None = None
    truststore_pem: bytes | None = None  # None: use the system trust store
    crl_pem: bytes | None = None  # None: no CRL check


@dataclass(frozen=True)
class Credentials:
    client: RoleCredentials = field(default_factory=RoleCredentials)
    server: RoleCredentials = field(default_factory=RoleCredentials)
