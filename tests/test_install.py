"""What a wheel installs, and `tlshd install-files`: unit, example config, man pages."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlshd import install

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built as pip builds it (an isolated build environment
    with the setuptools pyproject.toml asks for)."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
        check=True, timeout=240, capture_output=True,
    )  # fmt: skip
    return next(dist.glob("tlshd-*.whl"))


@pytest.fixture(scope="module")
def wheel_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with the wheel (no dependencies: the files and the
    install command need none)."""
    venv = tmp_path_factory.mktemp("wheel") / "opt-tlshd"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=240, capture_output=True,
    )  # fmt: skip
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def test_lab_guest_installer_places_data_files_as_pip_does(
    wheel: Path, wheel_venv: Path, tmp_path: Path
) -> None:
    """tests/lab/guest/install_wheel.py stands in for pip in the lab guest."""
    venv = tmp_path / "guest-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [venv / "bin" / "python", REPO / "tests/lab/guest/install_wheel.py", str(wheel)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    by_pip = sorted(p.relative_to(wheel_venv) for p in (wheel_venv / "share").rglob("*.*"))
    by_lab = sorted(p.relative_to(venv) for p in (venv / "share").rglob("*.*"))
    assert by_lab == by_pip and by_pip
    assert (venv / "bin" / "tlshd").is_file()
    assert not list(venv.glob("lib/python*/site-packages/*.data"))


def test_pip_install_puts_the_man_pages_and_unit_under_the_venv(wheel_venv: Path) -> None:
    share = wheel_venv / "share"
    for page, section in (("tlshd.8", "man8"), ("tlshd.conf.5", "man5")):
        installed = share / "man" / section / page
        assert installed.read_text() == (REPO / "man" / page).read_text()
    assert (share / "tlshd" / "tlshd.service").read_text() == (
        REPO / "systemd" / "tlshd.service"
    ).read_text()
    assert (share / "tlshd" / "config.example").is_file()


def test_install_files_from_the_wheel_install(wheel_venv: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.run(
        [wheel_venv / "bin" / "tlshd", "install-files", "--root", str(root)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    unit = (root / "etc/systemd/system/tlshd.service").read_text()
    # the unit names this install, not /opt/tlshd, and waits for its mount
    assert f"ExecStart={wheel_venv}/bin/tlshd\n" in unit
    assert f"RequiresMountsFor={wheel_venv}\n" in unit
    settings = [line for line in unit.splitlines() if line and not line.startswith("#")]
    assert not [line for line in settings if "/opt/tlshd" in line]
    assert (root / "etc/tlshd/config").read_text() == (REPO / "etc/config.example").read_text()
    for page in ("man8/tlshd.8", "man5/tlshd.conf.5"):
        target = root / "usr/local/share/man" / page
        assert target.read_text() == (REPO / "man" / Path(page).name).read_text()
        assert target.stat().st_mode & 0o777 == 0o644
    assert len(proc.stdout.splitlines()) == 4  # one line per file; no systemctl hint off /
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(root / "etc/systemd/system/tlshd.service")],  # noqa: E501
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # the generated ExecStart exists and is executable: no finding at all
        assert (verify.stdout + verify.stderr).strip() == ""


def test_an_existing_config_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "etc/tlshd/config"
    config.parent.mkdir(parents=True)
    config.write_text("[pool]\nmax_workers = 3\n")
    report = install.install_files(str(tmp_path))
    assert config.read_text() == "[pool]\nmax_workers = 3\n"
    assert any(line.startswith(f"kept {config}") for line in report)
    assert (tmp_path / "etc/systemd/system/tlshd.service").is_file()


def test_repository_unit_waits_for_its_install_mount() -> None:
    unit = (REPO / "systemd/tlshd.service").read_text()
    assert re.search(r"^DefaultDependencies=no$", unit, re.M)
    assert re.search(rf"^RequiresMountsFor={install.UNIT_PREFIX}$", unit, re.M)
    assert re.search(rf"^ExecStart={install.UNIT_EXEC}$", unit, re.M)


def test_unit_rewrite_refuses_a_unit_it_does_not_recognise() -> None:
    with pytest.raises(install.InstallError, match="RequiresMountsFor"):
        install.unit_for_this_install("[Service]\nExecStart=/usr/sbin/tlshd\n", "/x/tlshd", "/x")


def test_unwritable_root_is_an_error_naming_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "etc"
    blocker.write_text("a file where a directory should be")
    from tlshd import cli

    assert cli.main(["install-files", "--root", str(tmp_path)]) == 1


# --- the container image -----------------------------------------------------------------


def test_image_carries_oci_labels_and_the_man_pages() -> None:
    text = (REPO / "Dockerfile").read_text()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(rf"^ARG TLSHD_VERSION={re.escape(version)}$", text, re.M)
    for stage in ("dev", "runtime"):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        for label, arg in (("version", "TLSHD_VERSION"), ("revision", "TLSHD_REVISION"),
                           ("source", "TLSHD_SOURCE")):  # fmt: skip
            assert f'org.opencontainers.image.{label}="${{{arg}}}"' in body, (stage, label)
            assert f"ARG {arg}\n" in body, (stage, arg)
    for copied in ("man/", "systemd/", "etc/"):
        assert f"COPY {copied} {copied}" in text
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {"!man/", "!systemd/", "!etc/"} <= set(ignore)
