"""Access to kernel keys (keyrings(7)) through the add_key(2) and keyctl(2) syscalls.

Only the supervisor uses this module: workers run without privilege and ask the
supervisor for key material (tlshd.keys).  The calls go straight to the kernel
through ``libc.syscall`` with the architecture's syscall numbers, so no extra
library is needed; on an architecture we have no numbers for, libkeyutils.so.1
is used instead if it is installed.

Every failure raises `KeyringError`, an OSError carrying the kernel's errno and
a message naming the key or keyring involved.

Kernel facts this module relies on:

* Key serials are positive 32-bit ints; the special ids (KEY_SPEC_*) are small
  negative ints that the kernel resolves against the calling process.
* KEYCTL_READ and KEYCTL_DESCRIBE return the size the full answer needs, which
  may exceed the buffer given; the key can change between two calls, so the
  read is repeated until the buffer was big enough.
* Keyrings that the kernel itself creates (``.nvme``, ``.nfs``, ``.nfsd``) are
  linked into no process keyring, so they cannot be found by searching the
  process's own keyrings; /proc/keys lists every key the caller may view, and
  that is where `find_keyring_by_name` looks (as libkeyutils'
  find_key_by_type_and_desc does when its request_key attempt fails).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from tlshd.uapi import KEY_DESC_MAX, KEY_SERIAL_MAX

# keyctl(2) operations (include/uapi/linux/keyctl.h).
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_REVOKE = 3
KEYCTL_DESCRIBE = 6
KEYCTL_CLEAR = 7
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_SET_TIMEOUT = 15

# Special keyring ids, resolved by the kernel against the calling process.
KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5

# Keyring names as keyctl(1) spells them, accepted by resolve_keyring().
SPECIAL_KEYRINGS = {
    "@t": KEY_SPEC_THREAD_KEYRING,
    "@p": KEY_SPEC_PROCESS_KEYRING,
    "@s": KEY_SPEC_SESSION_KEYRING,
    "@u": KEY_SPEC_USER_KEYRING,
    "@us": KEY_SPEC_USER_SESSION_KEYRING,
}

# (add_key, keyctl) syscall numbers.  arm64 and riscv64 use asm-generic numbers.
SYSCALL_NUMBERS = {
    "x86_64": (248, 250),
    "amd64": (248, 250),
    "aarch64": (217, 219),
    "arm64": (217, 219),
    "riscv64": (217, 219),
}

PROC_KEYS = "/proc/keys"


class KeyringError(OSError):
    """A keyctl/add_key call failed; `errno` is the kernel's error number."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(errno_value, message)


@dataclass(frozen=True)
class KeyDescription:
    """The fields of KEYCTL_DESCRIBE, "type;uid;gid;perm;description"."""

    type: str
    uid: int
    gid: int
    perm: int
    description: str


class _Backend(Protocol):
    name: str

    def keyctl(self, op: int, *args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int: ...

    def add_key(self, key_type: bytes, description: bytes, payload: bytes, keyring: int) -> int: ...


def _c_arg(value: int | bytes | ctypes.Array[ctypes.c_char] | None) -> object:
    """Variadic arguments must be passed at full register width."""
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, int):
        return ctypes.c_long(value)
    return value


class _SyscallBackend:
    """Raw syscalls through libc.syscall(), numbers chosen by architecture."""

    name = "syscall"

    def __init__(self, libc: ctypes.CDLL, numbers: tuple[int, int]) -> None:
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._add_key_nr, self._keyctl_nr = numbers

    def keyctl(self, op: int, *args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int:
        padded = list(args) + [0] * (4 - len(args))
        return _checked(
            self._syscall(
                ctypes.c_long(self._keyctl_nr), ctypes.c_long(op), *(_c_arg(a) for a in padded)
            )
        )

    def add_key(self, key_type: bytes, description: bytes, payload: bytes, keyring: int) -> int:
        return _checked(
            self._syscall(
                ctypes.c_long(self._add_key_nr),
                key_type,
                description,
                payload,
                ctypes.c_size_t(len(payload)),
                ctypes.c_long(keyring),
            )
        )


class _KeyutilsBackend:
    """libkeyutils' keyctl() and add_key() wrappers, same semantics as the syscalls."""

    name = "libkeyutils"

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._keyctl = lib.keyctl
        self._keyctl.restype = ctypes.c_long
        self._add_key = lib.add_key
        self._add_key.restype = ctypes.c_int32
        self._add_key.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int32,
        ]

    def keyctl(self, op: int, *args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int:
        padded = list(args) + [0] * (4 - len(args))
        return _checked(self._keyctl(ctypes.c_int(op), *(_c_arg(a) for a in padded)))

    def add_key(self, key_type: bytes, description: bytes, payload: bytes, keyring: int) -> int:
        return _checked(self._add_key(key_type, description, payload, len(payload), keyring))


def _checked(result: int) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def select_backend(machine: str | None = None) -> _Backend:
    """Raw syscalls on a known 64-bit architecture, else libkeyutils.so.1.

    uname's machine names the kernel's architecture, so a 32-bit Python on a
    64-bit kernel must not use the 64-bit numbers: the pointer size decides too.
    (os.uname, not the platform module: that import is 45 ms of start-up under
    emulation, for the same field.)
    """
    machine = (machine or os.uname().machine).lower()
    numbers = SYSCALL_NUMBERS.get(machine)
    if numbers is not None and struct.calcsize("P") == 8:
        return _SyscallBackend(ctypes.CDLL(None, use_errno=True), numbers)
    try:
        return _KeyutilsBackend(ctypes.CDLL("libkeyutils.so.1", use_errno=True))
    except OSError as exc:
        raise KeyringError(
            errno.ENOSYS,
            f"no keyctl syscall numbers for {machine!r} and libkeyutils.so.1 is not available",
        ) from exc


_backend: _Backend | None = None


def backend() -> _Backend:
    global _backend
    if _backend is None:
        _backend = select_backend()
    return _backend


def _keyctl(what: str, op: int, *args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int:
    try:
        return backend().keyctl(op, *args)
    except KeyringError:
        raise
    except OSError as exc:
        raise KeyringError(exc.errno or errno.EIO, f"{what}: {exc.strerror}") from None


def _read_buffer(what: str, op: int, serial: int) -> bytes:
    """Call a size-then-fill keyctl op until the buffer holds the whole answer."""
    size = _keyctl(what, op, serial, None, 0)
    while True:
        buf = ctypes.create_string_buffer(max(size, 1))
        needed = _keyctl(what, op, serial, buf, size)
        if needed <= size:
            return buf.raw[:needed]
        size = needed


def read_key(serial: int) -> bytes:
    """The payload of key `serial` (needs read permission, or possession + search)."""
    return _read_buffer(f"read key {serial}", KEYCTL_READ, serial)


def parse_description(text: str) -> KeyDescription:
    """Split "type;uid;gid;perm;description"; the description may contain ';'."""
    parts = text.split(";", 4)
    if len(parts) != 5:
        raise ValueError(f"malformed key description {text!r}")
    key_type, uid, gid, perm, description = parts
    return KeyDescription(key_type, int(uid), int(gid), int(perm, 16), description)


def describe_key(serial: int) -> KeyDescription:
    """Type, owner, permissions and description of key `serial`."""
    raw = _read_buffer(f"describe key {serial}", KEYCTL_DESCRIBE, serial)
    text = raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
    try:
        return parse_description(text)
    except ValueError as exc:
        raise KeyringError(errno.EINVAL, f"describe key {serial}: {exc}") from None


def search_keyring(keyring: int, key_type: str, description: str, dest: int = 0) -> int | None:
    """Search `keyring` and the keyrings nested in it; the serial found or None.

    If `dest` is non-zero the key found is also linked into that keyring.
    """
    try:
        return _keyctl(
            f"search keyring {keyring} for {key_type} {description!r}",
            KEYCTL_SEARCH,
            keyring,
            key_type.encode(),
            description.encode(),
            dest,
        )
    except KeyringError as exc:
        if exc.errno == errno.ENOKEY:
            return None
        raise


def link_key(key: int, keyring: int) -> None:
    """Link `key` into `keyring` (needs link permission on the key, write on the ring)."""
    _keyctl(f"link key {key} into keyring {keyring}", KEYCTL_LINK, key, keyring)


def unlink_key(key: int, keyring: int) -> None:
    _keyctl(f"unlink key {key} from keyring {keyring}", KEYCTL_UNLINK, key, keyring)


def revoke_key(serial: int) -> None:
    _keyctl(f"revoke key {serial}", KEYCTL_REVOKE, serial)


def set_timeout(serial: int, seconds: int) -> None:
    """Expire key `serial` after `seconds` (0 clears the timeout)."""
    _keyctl(f"set timeout of key {serial}", KEYCTL_SET_TIMEOUT, serial, seconds)


def add_key(key_type: str, description: str, payload: bytes, keyring: int) -> int:
    """Add (or update) a key in `keyring`; its serial."""
    try:
        return backend().add_key(key_type.encode(), description.encode(), payload, keyring)
    except OSError as exc:
        raise KeyringError(
            exc.errno or errno.EIO,
            f"add {key_type} key {description!r} to keyring {keyring}: {exc.strerror}",
        ) from None


def get_keyring_id(special: int, create: bool = False) -> int:
    """The serial behind a KEY_SPEC_* id; ENOKEY if it does not exist and not `create`."""
    return _keyctl(f"get keyring id {special}", KEYCTL_GET_KEYRING_ID, special, 1 if create else 0)


def join_session_keyring(name: str | None = None) -> int:
    """Join (or create) a session keyring; None gives a new anonymous one.

    A forked worker calls this to stop sharing the supervisor's session
    keyring: possession of a key follows the keyrings a process holds, not its
    uid, so a shared session keyring would hand the worker the supervisor's keys.
    """
    arg = name.encode() if name is not None else None
    return _keyctl(f"join session keyring {name!r}", KEYCTL_JOIN_SESSION_KEYRING, arg)


@dataclass(frozen=True)
class ProcKey:
    """One line of /proc/keys (the type is cut to 9 characters there)."""

    serial: int
    perm: int
    uid: int
    gid: int
    type: str
    description: str


def _parse_proc_keys_line(line: str) -> ProcKey | None:
    # "%08x %c..c %5d %4s %08x %5d %5d %-9.9s " then the type's describe output;
    # keyrings append ": <count>" or ": empty" to their description.
    fields = line.rstrip("\n").split(None, 8)
    if len(fields) < 9:
        return None
    serial, _flags, _usage, _timeout, perm, uid, gid, key_type, rest = fields
    try:
        parsed = ProcKey(int(serial, 16), int(perm, 16), int(uid), int(gid), key_type, rest)
    except ValueError:
        return None
    if key_type == "keyring":
        parsed = ProcKey(
            parsed.serial,
            parsed.perm,
            parsed.uid,
            parsed.gid,
            key_type,
            re.sub(r": (?:\d+|empty)$", "", rest),
        )
    return parsed


def iter_proc_keys(path: str = PROC_KEYS) -> Iterator[ProcKey]:
    """The keys the caller may view, as /proc/keys lists them."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError as exc:
        raise KeyringError(exc.errno or errno.EIO, f"read {path}: {exc.strerror}") from None
    for line in lines:
        parsed = _parse_proc_keys_line(line)
        if parsed is not None:
            yield parsed


def is_keyring_named(serial: int, name: str) -> bool:
    """Whether key `serial` is (still) a keyring called `name`."""
    try:
        desc = describe_key(serial)
    except KeyringError:
        return False
    return desc.type == "keyring" and desc.description == name


def find_keyring_by_name(name: str, proc_keys: str = PROC_KEYS) -> int | None:
    """The serial of a keyring called `name` that this process can view, or None.

    Each candidate is confirmed with KEYCTL_DESCRIBE, which also rules out a
    keyring that died after /proc/keys was read.  If several keyrings share the
    name, the first listed (lowest serial) wins.
    """
    for key in iter_proc_keys(proc_keys):
        if key.type == "keyring" and key.description == name and is_keyring_named(key.serial, name):
            return key.serial
    return None


# --- `[authenticate] keyrings` entries ----------------------------------------------


def keyring_serial(entry: str) -> int | None:
    """The number an `[authenticate] keyrings` entry spells, or None for a name.

    Decimal or 0x-hex; the caller should first check `keyring_entry_problem`.
    """
    text = entry.strip()
    try:
        if re.fullmatch(r"[0-9]+", text):
            return int(text, 10)
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            return int(text, 16)
    except ValueError:
        return None  # more decimal digits than sys.get_int_max_str_digits() allows
    return None


def keyring_entry_problem(entry: str) -> str | None:
    """Why `entry` is neither a keyring name nor a key serial; None if it is one."""
    serial = keyring_serial(entry)
    if serial is not None:
        if not 1 <= serial <= KEY_SERIAL_MAX:
            return f"serial {entry!r} is out of range (1..{KEY_SERIAL_MAX})"
        return None
    if re.fullmatch(r"[+-]?[0-9]+|0[xX].*", entry):
        return f"{entry!r} looks like a number but is not a valid key serial"
    if len(entry.encode()) > KEY_DESC_MAX:
        return f"name is longer than {KEY_DESC_MAX} bytes"
    if any(ch.isspace() or not ch.isprintable() for ch in entry):
        return f"{entry!r} contains whitespace or control characters"
    return None


def parse_serial(spec: str) -> int | None:
    """A decimal or 0x-hex serial in the range of key serials, or None."""
    value = keyring_serial(spec)
    return value if value is not None and 1 <= value <= KEY_SERIAL_MAX else None


def resolve_keyring(spec: str) -> int | None:
    """A keyring given by name, by serial (decimal or 0x-hex) or as @p/@s/@u/@us.

    A number that is not a live keyring is tried as a name too, since keyring
    names may be all digits.
    """
    spec = spec.strip()
    if not spec:
        return None
    if spec in SPECIAL_KEYRINGS:
        try:
            return get_keyring_id(SPECIAL_KEYRINGS[spec])
        except KeyringError:
            return None
    serial = parse_serial(spec)
    if serial is not None:
        try:
            if describe_key(serial).type == "keyring":
                return serial
        except KeyringError:
            pass
    return find_keyring_by_name(spec)
