"""The lab builder's profile logic without building anything (no root, no network).

Kernel resolution order, the 7.x split packages, and above all pruning: one
image's build must never remove another image's kernel, root or initramfs
(the cache is shared by every profile and by concurrent users).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lab import build
from tests.lab.build import K7, K612, PROFILES, Kernel

K612_DIR = "kernel-linux-image-6.12.117+deb13-amd64-unsigned_6.12.117-1"
K612_OLD = "kernel-linux-image-6.12.99+deb13u1-amd64-unsigned_6.12.99-1"
K7_DIR = "kernel-linux-image-7.3.4+deb13-amd64_7.3.4-1~bpo13+1"
K7_OLD = "kernel-linux-image-7.2.12+deb13-amd64_7.2.12-1~bpo13+1"


def test_profiles() -> None:
    assert build.DEFAULT_PROFILE == "trixie"
    assert PROFILES["trixie"].kernel is K612 and PROFILES["trixie"].root.suite == "trixie"
    assert PROFILES["forky"].kernel is K7 and PROFILES["forky"].root.python == "3.14"
    # both forky images boot one root holding both kernels' modules
    assert PROFILES["forky-6.12"].root == PROFILES["forky"].root
    assert PROFILES["forky-6.12"].kernel is K612
    assert set(PROFILES["forky-6.12"].root_kernels) == {K612, K7}


def test_kernel_patterns() -> None:
    assert K612.pattern.match("linux-image-6.12.117+deb13-amd64-unsigned")
    assert not K612.pattern.match("linux-image-6.12.117+deb13-amd64")
    assert K7.pattern.match("linux-image-7.3.4+deb13-amd64")
    others = ("-amd64-dbg", "-rt-amd64", "-cloud-amd64")
    for other in [f"linux-image-7.3.4+deb13{tail}" for tail in others]:
        assert not K7.pattern.match(other), other
    assert not K7.pattern.match("linux-binary-7.3.4+deb13-amd64")


def test_newest_kernel_is_last_in_numeric_order() -> None:
    names = [
        "linux-image-7.2.12+deb13-amd64",
        "linux-image-7.3.4+deb13-amd64",
        "linux-image-7.2.9+deb13-amd64",
        "linux-image-6.12.117+deb13u2-amd64-unsigned",
        "linux-image-6.12.117+deb13-amd64-unsigned",
    ]
    assert sorted(names, key=build._kernel_sort_key) == [
        "linux-image-6.12.117+deb13-amd64-unsigned",
        "linux-image-6.12.117+deb13u2-amd64-unsigned",
        "linux-image-7.2.9+deb13-amd64",
        "linux-image-7.2.12+deb13-amd64",
        "linux-image-7.3.4+deb13-amd64",
    ]


class FakeApt:
    def __init__(self, depends: str) -> None:
        self.depends = depends

    def show(self, pkg: str) -> str:
        return f"Package: {pkg}\nVersion: 1\nDepends: {self.depends}\nSize: 1900\n"


def test_companions_of_a_7x_meta_package() -> None:
    apt = FakeApt(
        "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
        "linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), "
        "linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), "
        "linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)"
    )
    assert build._companions(apt, "linux-image-7.3.4+deb13-amd64") == [  # type: ignore[arg-type]
        "linux-base-7.3.4+deb13-amd64",
        "linux-binary-7.3.4+deb13-amd64",
        "linux-modules-7.3.4+deb13-amd64",
    ]


def test_a_6_12_package_has_no_companions() -> None:
    apt = FakeApt("kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2)")
    pkg = "linux-image-6.12.117+deb13-amd64-unsigned"
    assert build._companions(apt, pkg) == []  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    for name in (K612_DIR, K612_OLD, K7_DIR, K7_OLD):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".done").write_text("{}")
    return tmp_path


def present(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()}


def test_kernel_pruning_keeps_other_flavours(cache: Path) -> None:
    build._prune_kernels(cache, K7, cache / K7_DIR)
    assert present(cache) == {K612_DIR, K612_OLD, K7_DIR}
    build._prune_kernels(cache, K612, cache / K612_DIR)
    assert present(cache) == {K612_DIR, K7_DIR}


def add_root(cache: Path, name: str, base: str, kernels: list[str]) -> None:
    (cache / name).mkdir()
    meta = {"base": base, "kernel": kernels[0], "kernels": kernels, "wheels": "w", "recipe": "3"}
    (cache / name / ".done").write_text(json.dumps(meta))


def test_root_pruning_keeps_other_profiles_and_variants(cache: Path) -> None:
    add_root(cache, "root-trixie", "base-trixie", [K612_DIR])
    add_root(cache, "root-trixie-systemd", "base-trixie-systemd", [K612_DIR])
    add_root(cache, "root-forky", "base-forky", [K612_DIR, K7_DIR])
    add_root(cache, "root-forky-oldrecipe", "base-forky", [K612_DIR, K7_DIR])
    add_root(cache, "root-forky-old7", "base-forky", [K612_DIR, K7_OLD])
    add_root(cache, "root-trixie-old612", "base-trixie", [K612_OLD])
    kernels = [Kernel(cache / K612_DIR, "6.12.117"), Kernel(cache / K7_DIR, "7.3.4")]
    build._prune_roots(cache, kernels, cache / "root-forky")
    roots = {n for n in present(cache) if n.startswith("root-")}
    # gone: the same lineage by an older recipe, and a root of an older 7.x or 6.12
    assert roots == {"root-trixie", "root-trixie-systemd", "root-forky"}
    # a trixie build afterwards keeps the forky root
    build._prune_roots(cache, [Kernel(cache / K612_DIR, "6.12.117")], cache / "root-trixie")
    roots = {n for n in present(cache) if n.startswith("root-")}
    assert roots == {"root-trixie", "root-trixie-systemd", "root-forky"}


def test_a_root_in_use_by_a_guest_run_is_not_pruned(cache: Path) -> None:
    add_root(cache, "root-new", "base-trixie", [K612_DIR])
    add_root(cache, "root-running", "base-trixie", [K612_DIR])  # older recipe, same lineage
    kernels = [Kernel(cache / K612_DIR, "6.12.117")]
    held = build.hold_stage(cache / "root-running")
    try:
        build._prune_roots(cache, kernels, cache / "root-new")
        assert (cache / "root-running" / ".done").is_file()
    finally:
        held.close()
    build._prune_roots(cache, kernels, cache / "root-new")
    assert not (cache / "root-running").exists()
    assert (cache / "root-new").is_dir()


def test_an_initramfs_in_use_is_not_pruned(tmp_path: Path) -> None:
    old = tmp_path / "initramfs-0123456789abcdef.cpio.gz"
    old.write_bytes(b"x")
    held = build.hold_stage(old)
    try:
        assert build._remove_stage(old) is False
        assert old.is_file()
    finally:
        held.close()
    assert build._remove_stage(old) is True
    assert not old.exists() and not (tmp_path / (old.name + ".use.lock")).exists()
