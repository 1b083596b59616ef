"""tlshd.keyring against this machine's real kernel (needs CONFIG_KEYS).

Keys are created under a scratch keyring linked into the test process's own
process keyring, which nothing else on the machine shares, and are removed
after each test.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique
from tests.helpers.waiting import wait_until
from tlshd import keyring as kr

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/keys"), reason="kernel without KEYS")

needs_keyctl = pytest.mark.skipif(shutil.which("keyctl") is None, reason="keyctl not installed")


def keyctl(*args: str) -> str:
    return subprocess.run(
        ["keyctl", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout.strip()


def in_child(fn: Callable[[], Any]) -> Any:
    """Run fn in a forked child (fresh process keyring) and return its repr'd result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = repr(fn())
        except BaseException as exc:
            out = repr(("raised", type(exc).__name__, getattr(exc, "errno", None)))
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return eval(data)


# --- backend -----------------------------------------------------------------


def test_backend_is_raw_syscall_on_known_arch() -> None:
    assert kr.select_backend("x86_64").name == "syscall"
    assert kr.select_backend("aarch64").name == "syscall"


def test_aarch64_numbers_are_asm_generic() -> None:
    assert kr.SYSCALL_NUMBERS["aarch64"] == (217, 219)
    assert kr.SYSCALL_NUMBERS["x86_64"] == (248, 250)


def test_unknown_arch_falls_back_to_libkeyutils() -> None:
    try:
        ctypes.CDLL("libkeyutils.so.1")
    except OSError:
        pytest.skip("libkeyutils.so.1 not installed")
    backend = kr.select_backend("sparc64")
    assert backend.name == "libkeyutils"
    serial = backend.add_key(b"user", unique().encode(), b"via-libkeyutils", -2)
    try:
        assert serial > 0
        assert backend.keyctl(kr.KEYCTL_GET_KEYRING_ID, -2, 0) > 0
    finally:
        kr.unlink_key(serial, kr.KEY_SPEC_PROCESS_KEYRING)


def test_unknown_arch_without_libkeyutils_is_enosys(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ctypes.CDLL

    def fake_cdll(name: str | None, *a: Any, **kw: Any) -> ctypes.CDLL:
        if name == "libkeyutils.so.1":
            raise OSError("not found")
        return real(name, *a, **kw)

    monkeypatch.setattr(kr.ctypes, "CDLL", fake_cdll)
    with pytest.raises(kr.KeyringError) as info:
        kr.select_backend("sparc64")
    assert info.value.errno == errno.ENOSYS


# --- read / describe / add ---------------------------------------------------


def test_add_read_describe_roundtrip(scratch: int) -> None:
    payload = bytes(range(256)) * 80  # 20 KiB with NULs: the read must not stop at one
    name = unique()
    serial = kr.add_key("user", name, payload, scratch)
    assert serial > 0
    assert kr.read_key(serial) == payload
    desc = kr.describe_key(serial)
    assert desc.type == "user"
    assert desc.uid == os.getuid()
    assert desc.gid == os.getgid()
    assert desc.description == name
    assert desc.perm & 0x3F000000  # possessor bits


def test_empty_payload_reads_back_empty(scratch: int) -> None:
    serial = kr.add_key("keyring", unique(), b"", scratch)
    assert kr.read_key(serial) == b""  # an empty keyring lists no serials


def test_description_keeps_semicolons(scratch: int) -> None:
    name = f"{unique()};with;semicolons"
    serial = kr.add_key("user", name, b"x", scratch)
    assert kr.describe_key(serial).description == name


def test_parse_description() -> None:
    d = kr.parse_description("psk;0;0;3f010000;NVMe0R01 nqn.a nqn.b")
    assert d == kr.KeyDescription("psk", 0, 0, 0x3F010000, "NVMe0R01 nqn.a nqn.b")
    with pytest.raises(ValueError):
        kr.parse_description("user;0;0")


def test_read_missing_key_names_the_serial() -> None:
    with pytest.raises(kr.KeyringError) as info:
        kr.read_key(0x7FFFFFF0)
    assert info.value.errno == errno.ENOKEY
    assert str(0x7FFFFFF0) in str(info.value)
    assert isinstance(info.value, OSError)


def test_read_revoked_key(scratch: int) -> None:
    serial = kr.add_key("user", unique(), b"gone", scratch)
    kr.revoke_key(serial)
    with pytest.raises(kr.KeyringError) as info:
        kr.read_key(serial)
    assert info.value.errno == errno.EKEYREVOKED


def test_timeout_expires_key(scratch: int) -> None:
    """A key read at once is still there; within a few seconds of its one-second
    timeout, reading it fails with EKEYEXPIRED (and with nothing else)."""
    serial = kr.add_key("user", unique(), b"short-lived", scratch)
    kr.set_timeout(serial, 1)
    assert kr.read_key(serial) == b"short-lived"
    failure = wait_until(lambda: read_errno(serial), what="the key's expiry")
    assert failure == errno.EKEYEXPIRED


def read_errno(serial: int) -> int:
    """0 if the key can be read, else the kernel's errno."""
    try:
        kr.read_key(serial)
    except kr.KeyringError as err:
        return err.errno
    return 0


def test_add_key_unknown_type_names_the_key(scratch: int) -> None:
    with pytest.raises(kr.KeyringError) as info:
        kr.add_key("no-such-type", "d", b"x", scratch)
    assert info.value.errno == errno.ENODEV
    assert "no-such-type" in str(info.value)


# --- search / link -----------------------------------------------------------


def test_search_finds_and_misses(scratch: int) -> None:
    name = unique()
    serial = kr.add_key("user", name, b"v", scratch)
    assert kr.search_keyring(scratch, "user", name) == serial
    assert kr.search_keyring(scratch, "user", name + "-nope") is None
    assert kr.search_keyring(scratch, "logon", name) is None  # type must match too


def test_search_descends_into_nested_keyrings(scratch: int) -> None:
    inner = kr.add_key("keyring", unique(), b"", scratch)
    name = unique()
    serial = kr.add_key("user", name, b"v", inner)
    assert kr.search_keyring(scratch, "user", name) == serial


def test_search_with_dest_links_the_result(scratch: int) -> None:
    src = kr.add_key("keyring", unique(), b"", scratch)
    dest = kr.add_key("keyring", unique(), b"", scratch)
    name = unique()
    serial = kr.add_key("user", name, b"v", src)
    assert kr.search_keyring(src, "user", name, dest) == serial
    assert kr.search_keyring(dest, "user", name) == serial


def test_search_missing_keyring_is_not_found() -> None:
    # KEYCTL_SEARCH says ENOKEY both for a missing keyring and a missing key
    assert kr.search_keyring(0x7FFFFFF0, "user", "x") is None


def test_search_for_unregistered_type_is_not_found(scratch: int) -> None:
    # key_type_lookup() fails with ENOKEY: a kernel without nvme-keyring (no
    # "psk" type) simply finds no PSK.
    assert kr.search_keyring(scratch, "no-such-type", "x") is None


def test_link_and_unlink(scratch: int) -> None:
    a = kr.add_key("keyring", unique(), b"", scratch)
    b = kr.add_key("keyring", unique(), b"", scratch)
    name = unique()
    serial = kr.add_key("user", name, b"v", a)
    kr.link_key(serial, b)
    assert kr.search_keyring(b, "user", name) == serial
    kr.unlink_key(serial, b)
    assert kr.search_keyring(b, "user", name) is None
    with pytest.raises(kr.KeyringError) as info:
        kr.unlink_key(serial, b)
    assert info.value.errno == errno.ENOENT
    assert str(serial) in str(info.value)


# --- special keyrings --------------------------------------------------------


def test_process_keyring_is_created_only_on_request() -> None:
    def probe() -> tuple[object, int]:
        try:
            before: object = kr.get_keyring_id(kr.KEY_SPEC_PROCESS_KEYRING)
        except kr.KeyringError as exc:
            before = exc.errno
        return before, kr.get_keyring_id(kr.KEY_SPEC_PROCESS_KEYRING, create=True)

    before, created = in_child(probe)
    assert before == errno.ENOKEY  # a forked child does not inherit the process keyring
    assert created > 0


def test_join_anonymous_session_keyring() -> None:
    parent = kr.get_keyring_id(kr.KEY_SPEC_SESSION_KEYRING, create=True)

    def child() -> tuple[int, int]:
        inherited = kr.get_keyring_id(kr.KEY_SPEC_SESSION_KEYRING)
        return inherited, kr.join_session_keyring(None)

    inherited, fresh = in_child(child)
    assert inherited == parent  # the session keyring IS inherited across fork
    assert fresh not in (parent, 0)


# --- /proc/keys and name resolution ------------------------------------------

PROC_KEYS_SAMPLE = """\
0dc7a7c0 I------     1 perm 1f0b0000     0     0 keyring   .builtin_trusted_keys: empty
1a2b3c4d I--Q---     2 perm 3f3f0000     0     0 keyring   .nvme: 3
0000abcd I--Q---     1 perm 3f010000     0     0 psk       NVMe0R01 nqn.h nqn.s: 32
00001234 I--Q---     1  59m 3f010000     0     0 asymmetri peer cert: X509.rsa 1234abcd []
00004321 I--Q---     1 perm 3f3f0000  1000  1000 keyring   name with spaces: 12
garbage line
zzzzzzzz I--Q---     1 perm 3f3f0000     0     0 keyring   bad-serial: empty
"""


def test_parse_proc_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(PROC_KEYS_SAMPLE)
    keys = list(kr.iter_proc_keys(str(path)))
    assert [k.serial for k in keys] == [0x0DC7A7C0, 0x1A2B3C4D, 0xABCD, 0x1234, 0x4321]
    assert keys[1] == kr.ProcKey(0x1A2B3C4D, 0x3F3F0000, 0, 0, "keyring", ".nvme")
    assert keys[0].description == ".builtin_trusted_keys"
    assert keys[2].description == "NVMe0R01 nqn.h nqn.s: 32"  # only keyrings are trimmed
    assert keys[3].type == "asymmetri"  # /proc/keys cuts the type at 9 characters
    assert keys[4].description == "name with spaces"
    assert keys[4].uid == 1000


def test_find_keyring_confirms_candidates_with_describe(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(PROC_KEYS_SAMPLE)
    # .nvme is listed in the fake file but no such serial lives in the kernel
    assert kr.find_keyring_by_name(".nvme", proc_keys=str(path)) is None


def test_missing_proc_keys_raises(tmp_path: Path) -> None:
    with pytest.raises(kr.KeyringError) as info:
        kr.find_keyring_by_name("x", proc_keys=str(tmp_path / "none"))
    assert info.value.errno == errno.ENOENT


def test_find_keyring_by_name(scratch: int) -> None:
    name = unique()
    ring = kr.add_key("keyring", name, b"", scratch)
    assert kr.find_keyring_by_name(name) == ring
    assert kr.find_keyring_by_name(name + "-absent") is None
    # a non-keyring with that name is not a keyring
    other = unique()
    kr.add_key("user", other, b"x", scratch)
    assert kr.find_keyring_by_name(other) is None


def test_find_kernel_keyring_not_in_search_path() -> None:
    # .builtin_trusted_keys (CONFIG_SYSTEM_TRUSTED_KEYRING) is linked into no
    # process's keyrings, which is exactly the case of .nvme/.nfs/.nfsd.
    found = kr.find_keyring_by_name(".builtin_trusted_keys")
    if found is None:
        pytest.skip("kernel without a system trusted keyring")
    assert kr.describe_key(found).description == ".builtin_trusted_keys"


@needs_keyctl
def test_find_keyring_made_by_keyctl_in_another_session(tmp_path: Path) -> None:
    name = unique()
    marker = tmp_path / "serial"
    holder = subprocess.Popen(
        ["keyctl", "session", "-", "sh", "-c",
         f"keyctl newring {name} @s > {marker}; exec sleep 30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(
            lambda: marker.exists() and marker.read_text().strip(), what="keyctl's new keyring"
        )
        serial = int(marker.read_text())
        assert kr.find_keyring_by_name(name) == serial
        assert kr.resolve_keyring(name) == serial
    finally:
        holder.kill()
        holder.wait()


def test_parse_serial() -> None:
    assert kr.parse_serial("123") == 123
    assert kr.parse_serial(" 0x1f ") == 31
    assert kr.parse_serial("0X1F") == 31
    for bad in ("", "0", "-5", "12a", "0x", "1.5", "0x80000000", ".nvme"):
        assert kr.parse_serial(bad) is None, bad


def test_resolve_keyring(scratch: int) -> None:
    name = unique()
    ring = kr.add_key("keyring", name, b"", scratch)
    assert kr.resolve_keyring(name) == ring
    assert kr.resolve_keyring(f" {name} ") == ring
    assert kr.resolve_keyring(str(ring)) == ring
    assert kr.resolve_keyring(hex(ring)) == ring
    assert kr.resolve_keyring("@p") == kr.get_keyring_id(kr.KEY_SPEC_PROCESS_KEYRING)
    assert kr.resolve_keyring("") is None
    assert kr.resolve_keyring(unique("absent")) is None
    assert kr.resolve_keyring("0x7ffffff0") is None
    user_key = kr.add_key("user", unique(), b"x", scratch)
    assert kr.resolve_keyring(str(user_key)) is None  # a serial, but not a keyring


def test_resolve_all_digit_name_falls_back_to_name(scratch: int) -> None:
    name = str(0x7FFFFF00 + (uuid.uuid4().int % 0xF0))  # a serial that is most likely free
    ring = kr.add_key("keyring", name, b"", scratch)
    if ring == int(name):
        pytest.skip("the serial happened to match")
    assert kr.resolve_keyring(name) == ring


# --- interop with keyctl(1) --------------------------------------------------


@needs_keyctl
def test_keyctl_and_module_agree(scratch: int) -> None:
    # let keyctl (another process, not a possessor) write into the scratch ring
    kr._keyctl("setperm", 5, scratch, 0x3F3F0000)  # KEYCTL_SETPERM
    name = unique()
    serial = int(keyctl("add", "user", name, "from-keyctl", str(scratch)))
    assert kr.read_key(serial) == b"from-keyctl"
    assert kr.search_keyring(scratch, "user", name) == serial
    ours = kr.add_key("user", unique(), b"from-module", scratch)
    text = keyctl("rdescribe", str(ours))
    assert kr.parse_description(text) == kr.describe_key(ours)
    # keyctl(1) is another process: it does not possess the ring, and a key
    # added with default permissions grants non-possessors VIEW only, so its
    # search is refused.  This is why the supervisor links keyrings into its
    # process keyring before searching them.
    with pytest.raises(subprocess.CalledProcessError) as info:
        keyctl("search", str(scratch), "user", name)
    assert "Permission denied" in info.value.stderr
