"""`tlshd install-files [--root DIR]`: put the unit, the example config and the
man pages where systemd and man(1) look, from a wheel install.

pip installs the files under the environment's data directory
(`<venv>/share/tlshd`, `<venv>/share/man`, see pyproject.toml), which neither
systemd nor man searches.  This command copies them out:

    <root>/etc/systemd/system/tlshd.service    the unit, for this install
    <root>/etc/tlshd/config                    the example, only if there is none
    <root>/usr/local/share/man/man8/tlshd.8
    <root>/usr/local/share/man/man5/tlshd.conf.5

The unit is rewritten for the install it comes from: ExecStart= names this
environment's `tlshd`, and RequiresMountsFor= its prefix.  The unit runs with
DefaultDependencies=no (early boot, before remote file systems), which also
drops the ordering after local file systems: without RequiresMountsFor= a
prefix on its own mount (/opt, /usr/local) might not be mounted yet.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The paths the unit in the repository is written for (the image and the lab).
UNIT_PREFIX = "/opt/tlshd"
UNIT_EXEC = "/opt/tlshd/bin/tlshd"

_SOURCE_TREE = Path(__file__).resolve().parent.parent


class InstallError(Exception):
    """A file to install is missing or a target cannot be written."""


@dataclass(frozen=True)
class Item:
    source: str  # file name under <data>/share/..., and where the source tree has it
    data_dir: str
    tree_path: str
    target: str  # relative to the root
    keep_existing: bool = False


ITEMS = (
    Item(
        "tlshd.service", "share/tlshd", "systemd/tlshd.service", "etc/systemd/system/tlshd.service"
    ),
    Item("config.example", "share/tlshd", "etc/config.example", "etc/tlshd/config", True),
    Item("tlshd.8", "share/man/man8", "man/tlshd.8", "usr/local/share/man/man8/tlshd.8"),
    Item(
        "tlshd.conf.5",
        "share/man/man5",
        "man/tlshd.conf.5",
        "usr/local/share/man/man5/tlshd.conf.5",
    ),
)


def source_path(item: Item) -> Path:
    """The installed data file; in a source checkout (editable install), the tree's."""
    for candidate in (
        Path(sysconfig.get_path("data")) / item.data_dir / item.source,
        _SOURCE_TREE / item.tree_path,
    ):
        if candidate.is_file():
            return candidate
    raise InstallError(f"{item.source}: not found in {sysconfig.get_path('data')}/{item.data_dir}")


def unit_for_this_install(text: str, executable: str, prefix: str) -> str:
    """The repository's unit with ExecStart= and RequiresMountsFor= for this install."""
    text, execs = re.subn(
        rf"^ExecStart={re.escape(UNIT_EXEC)}$", f"ExecStart={executable}", text, flags=re.M
    )
    text, mounts = re.subn(
        rf"^RequiresMountsFor={re.escape(UNIT_PREFIX)}$",
        f"RequiresMountsFor={prefix}",
        text,
        flags=re.M,
    )
    if execs != 1 or mounts != 1:
        raise InstallError(
            f"the unit has no ExecStart={UNIT_EXEC} or RequiresMountsFor={UNIT_PREFIX} line"
        )
    return text


def this_executable() -> str:
    """The `tlshd` console script of the running environment."""
    script = Path(sysconfig.get_path("scripts")) / "tlshd"
    return str(script if script.exists() else Path(sys.argv[0]).resolve())


def install_files(root: str = "/") -> list[str]:
    """Install every item under `root`; one line per file saying what was done."""
    report = []
    for item in ITEMS:
        target = Path(root) / item.target
        if item.keep_existing and target.exists():
            report.append(f"kept {target} (exists; the example is {source_path(item)})")
            continue
        text = source_path(item).read_text()
        if item.source == "tlshd.service":
            text = unit_for_this_install(text, this_executable(), sys.prefix)
        _write(target, text)
        report.append(f"installed {target}")
    return report


def _write(target: Path, text: str) -> None:
    """Replace `target` atomically, mode 0644 (the unit, config and pages are public)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        raise InstallError(f"{target}: {err.strerror or err}") from None
