"""man/tlshd.8 and man/tlshd.conf.5: they render without warnings, and every
configuration key the parser accepts is documented."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tlshd.config import KNOWN_KEYS

MAN = Path(__file__).resolve().parent.parent / "man"
PAGES = [MAN / "tlshd.8", MAN / "tlshd.conf.5"]
# ktls-utils' sections (and its historical spellings); every other one is ours.
UPSTREAM_SECTIONS = {
    "debug",
    "authenticate",
    "authenticate.client",
    "authenticate.server",
    "main",
    "authentication",
}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_renders_without_groff_warnings(page: Path) -> None:
    if not shutil.which("groff"):
        pytest.skip("groff not installed")
    proc = subprocess.run(
        ["groff", "-ww", "-man", "-Tutf8", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "tlshd" in proc.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_reads_it_without_warnings(page: Path) -> None:
    if not shutil.which("man"):
        pytest.skip("man-db not installed")
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"MANPAGER": "cat", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "SEE ALSO" in proc.stdout


def documented_keys(text: str) -> dict[str, tuple[str, set[str]]]:
    """{section: (its .SS heading, keys)} from `.SS "[section] ..."` headings and
    the `.TP` / `.B key` entries under each."""
    sections: dict[str, tuple[str, set[str]]] = {}
    current: set[str] | None = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SH"):
            current = None
        elif heading := re.match(r'^\.SS "?\[([^\]]+)\]', line):
            current = sections.setdefault(heading.group(1), (line, set()))[1]
        elif current is not None and line == ".TP" and i + 1 < len(lines):
            key = re.match(r"^\.B (\S+)$", lines[i + 1])
            if key:
                current.add(key.group(1))
    return sections


def test_every_key_the_parser_accepts_is_documented() -> None:
    documented = documented_keys((MAN / "tlshd.conf.5").read_text())
    missing = {
        f"[{section}] {key}"
        for section, keys in KNOWN_KEYS.items()
        for key in keys
        if key not in documented.get(section, ("", set()))[1]
    }
    assert not missing, f"not documented in man/tlshd.conf.5: {sorted(missing)}"
    unknown = {
        f"[{section}] {key}"
        for section, (_, keys) in documented.items()
        for key in keys
        if key not in KNOWN_KEYS.get(section, frozenset())
    }
    assert not unknown, f"documented but not accepted by the parser: {sorted(unknown)}"


def test_our_sections_are_marked_as_ours() -> None:
    documented = documented_keys((MAN / "tlshd.conf.5").read_text())
    for section in KNOWN_KEYS:
        heading = documented[section][0]
        assert ("(ours)" in heading) == (section not in UPSTREAM_SECTIONS), heading


def test_tlshd_8_has_an_entry_for_every_option_and_command() -> None:
    text = (MAN / "tlshd.8").read_text().replace("\\-", "-")
    lines = text.splitlines()
    entries = " ".join(lines[i + 1] for i, line in enumerate(lines[:-1]) if line == ".TP")
    for option in cli_options():
        assert option in entries.split() or f"{option} " in entries, option
    for command in ("status", "install-files", "--check-config", "--socket"):
        assert command in entries, command
    for section in ("SIGNALS", "EXIT STATUS", "FILES", "PROCESS MODEL", "ENVIRONMENT"):
        assert f".SH {section}" in text, section


def cli_options() -> list[str]:
    """Every option spelling the command line accepts (tlshd.cli's table)."""
    from tlshd import cli

    return sorted(cli._OPTIONS)
