"""The PEM files a configuration names, read by the privileged supervisor.

Private keys are root-only files (mode 0600) and workers run unprivileged, so
the supervisor reads every configured file, once per configuration
generation.  It does not parse them: parsing needs cryptography, whose import
is the largest single cost of start-up (about 1 s of the guest's 3.5 s under
QEMU TCG, benchmarks/README.md).  At start the zygote parses the bytes
(tlshd.credentials.load_credentials with `files=`), on its own CPU while the
supervisor opens its sockets, and a file that does not parse stops the daemon
there, named as before.  Nothing in this module imports OpenSSL or
cryptography.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from tlshd.config import (
    MAX_PEM_BYTES,
    ROLE_FILE_KEYS,
    Config,
    ConfigKey,
    FileProblem,
    RoleConfig,
    read_bounded,
)

ROLES = ("client", "server")
ROLE_SECTIONS = {"client": "authenticate.client", "server": "authenticate.server"}
# A scheme prefix per RFC 3986 (upstream hands such strings to gnutls_privkey_import_url).
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class CredentialsError(Exception):
    """A configured credential file cannot be used."""

    def __init__(self, file: str, key: ConfigKey, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason


def key_label(role: str, key: str) -> ConfigKey:
    """[authenticate.server] x509.certificate for ("server", "x509.certificate")."""
    return ConfigKey(ROLE_SECTIONS[role], key)


def read_file(path: str, label: ConfigKey) -> bytes:
    """The contents of a configured PEM file (regular, at most MAX_PEM_BYTES,
    never blocking: see tlshd.config.read_bounded); CredentialsError otherwise."""
    try:
        return read_bounded(path, MAX_PEM_BYTES)
    except FileProblem as problem:
        raise CredentialsError(path, label, str(problem)) from None


def reject_url(value: str, label: ConfigKey) -> None:
    if _URL_RE.match(value):
        raise CredentialsError(
            value,
            label,
            "private key URLs (pkcs11:, tpmkey:, ...) are not supported; "
            "for a relative file name starting with a scheme-like prefix, write ./name",
        )


def configured_files(role: str, rc: RoleConfig) -> Iterator[tuple[str, str]]:
    """(config key, path) of every file one role's section names."""
    for key, field_name in ROLE_FILE_KEYS.items():
        path = getattr(rc, field_name)
        if path:
            yield key, path


@dataclass(frozen=True)
class CredentialFiles:
    """The bytes of every configured file, by path, as read at one moment."""

    contents: Mapping[str, bytes] = field(default_factory=dict)

    def read(self, path: str, label: ConfigKey) -> bytes:
        try:
            return self.contents[path]
        except KeyError:
            # A path the config did not name when the files were read: a bug,
            # but say which file, as for any other unreadable one.
            raise CredentialsError(path, label, "was not read with the configuration") from None


def read_credential_files(config: Config) -> CredentialFiles:
    """Read every PEM file of both roles; raises CredentialsError (naming the
    file and the key) on the first one that cannot be read.  Parsing is
    tlshd.credentials.load_credentials(config, files=...)."""
    contents: dict[str, bytes] = {}
    for role in ROLES:
        for key, path in configured_files(role, config.role(role)):
            label = key_label(role, key)
            if key.endswith("private_key"):
                reject_url(path, label)
            if path not in contents:
                contents[path] = read_file(path, label)
    return CredentialFiles(contents)
