"""SSL contexts built once per configuration generation, in the zygote.

Building a context per handshake repeats work whose result depends only on the
generation's configuration: loading the certificate and key (pyOpenSSL turns
the parsed key into an EVP_PKEY and checks it against the certificate each
time) and the trust store (with no `x509.truststore`, the system bundle: some
150 certificates parsed, about 4 ms of CPU per handshake).  The x509 shapes
that use only configured material are therefore built once, by the zygote
after its warm-up handshake and before gc.freeze(), and every single-use
worker forked from it inherits a copy.

Isolation holds by construction: each prepared entry carries the pristine
`TlsState` its callbacks are bound to, and `take_prepared` hands an entry out
at most once per process.  A worker serves one handshake, so its copy of the
entry serves that handshake only; any second handshake in the same process
(the zygote's own warm-up, tests, the in-process engine) builds a fresh context
with a fresh TlsState.  Per-connection settings (the expected peer name, the
accept or connect state) stay on the SSL.Connection, made per handshake.

Not prepared, built per handshake as before: PSK contexts (the key comes from
the request) and x509 contexts whose certificate and key the ACCEPT names
(keyring serials).  A role whose material does not load is not prepared
either: its handshakes then fail on the per-handshake path, with the same
status, message and alert as without preparation.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from OpenSSL import SSL
from tlshd.workers import tlsctx
from tlshd.workers.tlsctx import TlsState

from tlshd.credentials import Credentials, RoleCredentials
from tlshd.log import log


class Shape(enum.Enum):
    """An x509 context shape: the role and whether a local certificate is used."""

    SERVER_X509 = "server x509"
    CLIENT_UNAUTH = "client unauthenticated"
    CLIENT_X509 = "client x509"

    @property
    def role(self) -> str:
        return "server" if self is Shape.SERVER_X509 else "client"

    @property
    def uses_certificate(self) -> bool:
        return self is not Shape.CLIENT_UNAUTH


@dataclass
class PreparedContext:
    """A context and the TlsState its callbacks report into, for one handshake."""

    context: SSL.Context
    state: TlsState
    credentials: RoleCredentials  # what it was built from


# The entries this process has not handed out yet.  A module global on
# purpose: fork copies it into every worker, and each worker's copy is its own.
_prepared: dict[Shape, PreparedContext] = {}


def build_context(
    shape: Shape,
    state: TlsState,
    creds: RoleCredentials,
    install_certificate: Callable[[SSL.Context], None] | None = None,
) -> SSL.Context:
    """A context of `shape` whose callbacks report into `state`.

    `install_certificate` loads the local certificate and key (the ACCEPT's
    keyring material); by default the role's configured ones are used.
    Raises tlsctx.CredentialError when the material is missing or unusable.
    """
    context = tlsctx.new_context(state)
    if shape.uses_certificate:
        if install_certificate is None:
            tlsctx.use_configured_certificate(context, creds, shape.role)
        else:
            install_certificate(context)
    tlsctx.configure_trust(context, creds)
    if shape is Shape.SERVER_X509:
        tlsctx.set_verify_server_role(context, state)
    else:
        tlsctx.set_verify_client_role(context, state)
    return context


def prepare_contexts(credentials: Credentials) -> tuple[Shape, ...]:
    """Build one context per shape whose configured material loads; the
    shapes prepared.  Replaces whatever this process had prepared before.
    Never raises: a shape that cannot be built is left to the per-handshake
    path, which reports its failure to the kernel as it always did."""
    _prepared.clear()
    for shape in Shape:
        creds = credentials.role(shape.role)
        state = TlsState()
        try:
            context = build_context(shape, state, creds)
        except Exception as err:  # tlsctx.CredentialError, or OpenSSL refusing anything
            log.debug("no prepared %s context: %s", shape.value, err)
            continue
        _prepared[shape] = PreparedContext(context, state, creds)
    return tuple(_prepared)


def take_prepared(shape: Shape, creds: RoleCredentials) -> PreparedContext | None:
    """The prepared entry for `shape` if this process still has it and it was
    built from `creds`; it is never handed out again.  None: build one."""
    entry = _prepared.pop(shape, None)
    if entry is None or entry.credentials != creds:
        return None
    return entry


def prepared_shapes() -> tuple[Shape, ...]:
    """The shapes this process could still take (for tests and the benchmark)."""
    return tuple(_prepared)
