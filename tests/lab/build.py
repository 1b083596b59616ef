"""Build and cache the real-kernel lab: kernel, guest root filesystem, initramfs.

Everything lands in a cache directory OUTSIDE the checkout (``$TLSHD_LAB_CACHE``,
default ``/var/cache/tlshd-lab``).  Each stage is keyed by a hash of its inputs
and rebuilt only when they change:

=============  ===========================================================
stage          key (inputs)
=============  ===========================================================
apt lists      suite, mirror URI (refreshed only when a stage needs them)
kernel         the resolved package name/version of one kernel flavour
               (``linux-image-6.12.*-amd64-unsigned`` from trixie,
               ``linux-image-7.*-amd64`` from trixie-backports)
base root      suite, debootstrap package list (+ extra packages)
wheels         the project's runtime requirements, guest Python ABI, platforms
root           base + kernel(s) + wheels + ``ROOT_RECIPE`` (modules, venv, config)
initramfs      kernel + init script + busybox binary
=============  ===========================================================

An image *profile* (:data:`PROFILES`) names the kernel that boots and the root
it boots: ``trixie`` (the default: Debian 13's 6.12 and upstream tlshd 1.0.0),
``forky`` (the newest 7.x kernel and a forky root with upstream 1.4.0) and
``forky-6.12`` (that forky root on the 6.12 kernel).  Stages are shared where
their inputs are (both forky profiles boot the same root, which holds both
kernels' modules), and pruning only replaces a stage by a newer one of the same
kind: it never removes another profile's kernel, root or initramfs.

The project's own code is NOT part of any stage: :mod:`tests.lab.vm` builds a
wheel of the working tree for every run and the guest installs it at boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
LAB = Path(__file__).resolve().parent

SUITE = "trixie"  # the default profile's root suite (and the 6.12 kernel's)
BASE_PACKAGES: tuple[str, ...] = (
    "ktls-utils",
    "nfs-kernel-server",
    "nfs-common",
    "kmod",
    "iproute2",
    "keyutils",
    "python3",
    "python3-venv",
    "python3-pip",
    "openssl",
    "gnutls-bin",
    "procps",
    "util-linux",
    "busybox",
    "nvme-cli",
)
GUEST_PYTHON = "3.13"  # the trixie root's; see RootSpec.python
WHEEL_PLATFORMS: tuple[str, ...] = (
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


@dataclass(frozen=True)
class KernelFlavour:
    """A line of Debian kernels; the newest package matching ``pattern`` is used."""

    name: str  # short tag, used in cache file names: "6.12", "7"
    suite: str  # the apt suite that carries it
    pattern: re.Pattern[str]  # image package names
    pin: str  # cache file that pins the resolved package (until --refresh)


@dataclass(frozen=True)
class RootSpec:
    """A debootstrapped Debian root and the guest Python it brings."""

    suite: str
    python: str  # "3.13": the wheels of the project's dependencies are for this ABI
    # debootstrap script to use when the host's debootstrap has none for the suite
    # (bookworm's has no "forky"; the "sid" one bootstraps any testing suite)
    script: str | None = None
    packages: tuple[str, ...] = BASE_PACKAGES


@dataclass(frozen=True)
class Profile:
    name: str
    kernel: KernelFlavour  # the kernel that boots
    root: RootSpec
    root_kernels: tuple[KernelFlavour, ...]  # whose modules the root holds
    upstream: str  # the ktls-utils version the root ships (documentation only)


# Debian 13 (trixie)'s kernel: what Debian stable users run.
K612 = KernelFlavour(
    "6.12",
    "trixie",
    re.compile(r"^linux-image-6\.12\.[0-9]+\+deb13(u[0-9]+)?-amd64-unsigned$"),
    "kernel.json",
)
# The newest kernel Debian builds for trixie: trixie-backports (7.3 on 2026-11-29;
# forky and sid carry 7.2).  From 7.x on the image package is a meta package; the
# kernel is in linux-binary-*, the modules in linux-modules-*, config and
# modules.builtin* in linux-base-* (see _companions).
K7 = KernelFlavour(
    "7",
    "trixie-backports",
    re.compile(r"^linux-image-7\.[0-9]+\.[0-9]+\+deb13(u[0-9]+)?-amd64$"),
    "kernel.7.json",
)
KERNEL_FLAVOURS = (K612, K7)
KERNEL_PATTERN = K612.pattern  # the default profile's (kept for callers of the old name)
TRIXIE_ROOT = RootSpec("trixie", GUEST_PYTHON)
# forky (Debian testing): ktls-utils 1.4.0 (needs GnuTLS >= 3.8.11), OpenSSL 3.6,
# GnuTLS 3.8.13, nvme-cli 2.16, nfs-utils 3.1, Python 3.14.
FORKY_ROOT = RootSpec("forky", "3.14", script="sid")
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("trixie", K612, TRIXIE_ROOT, (K612,), "1.0.0"),
        Profile("forky", K7, FORKY_ROOT, (K7, K612), "1.4.0"),
        # Upstream 1.4.0 fails every handshake here: it treats the missing
        # TLS_TX_MAX_PAYLOAD_LEN sockopt (kernel < 6.19) as fatal.
        Profile("forky-6.12", K612, FORKY_ROOT, (K7, K612), "1.4.0"),
    )
}
DEFAULT_PROFILE = "trixie"
# Kernel modules the initramfs needs to mount the 9p root and the overlay.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Bump when the root recipe (what _build_root does beyond the inputs) changes.
ROOT_RECIPE = "4"
GUEST_VENV = "/opt/tlshd"
MIN_FREE_BYTES = 4 * 1024**3

HOST_TOOLS: dict[str, str] = {
    # executable -> Debian package
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "cpio": "cpio",
    "depmod": "kmod",
    "zstd": "zstd",
    "xz": "xz-utils",
    "openssl": "openssl",
}


class LabError(RuntimeError):
    """A lab prerequisite is missing; the message says what to do."""


def log(msg: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("TLSHD_LAB_CACHE", "/var/cache/tlshd-lab"))


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def run(cmd: Sequence[str | os.PathLike[str]], **kw: object) -> subprocess.CompletedProcess:
    """Run a command, raising LabError with its output tail on failure."""
    argv = [str(c) for c in cmd]
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("text", True)
    p = subprocess.run(argv, check=False, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        out = (p.stdout or "")[-4000:] if isinstance(p.stdout, str) else ""
        raise LabError(f"command failed ({p.returncode}): {' '.join(argv)}\n{out}")
    return p


# --------------------------------------------------------------------------- host


def _dpkg_installed(pkg: str) -> bool:
    p = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
    )
    return p.returncode == 0 and "install ok installed" in p.stdout


def ensure_host_tools() -> None:
    """Install the host packages the lab needs (as root), or explain what is missing."""
    missing = sorted({pkg for exe, pkg in HOST_TOOLS.items() if not _which(exe)})
    if not _dpkg_installed("busybox-static"):
        missing.append("busybox-static")
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabError(
            "the lab needs these Debian packages: "
            + " ".join(missing)
            + f"; run as root (it installs them) or: apt-get install -y {' '.join(missing)}"
        )
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        run(["apt-get", "update"], env=env)
        run(cmd, env=env)


def _which(exe: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(exe, path=path)


def check_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "the lab must run as root (debootstrap, chroot, QEMU's 9p root share "
            "with security_model=none keep file ownership only as root)"
        )


def check_disk(path: Path, need: int = MIN_FREE_BYTES) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise LabError(
            f"not enough disk space in {path}: {free / 2**30:.1f} GiB free, the lab "
            f"needs {need / 2**30:.1f} GiB (set TLSHD_LAB_CACHE to another place)"
        )


def debian_mirror() -> str:
    """The Debian archive URI this machine's apt already uses (never hard-coded)."""
    if uri := os.environ.get("TLSHD_LAB_MIRROR"):
        return uri.rstrip("/")
    candidates: list[str] = []
    srcdir = Path("/etc/apt/sources.list.d")
    for f in sorted(srcdir.glob("*.sources")) if srcdir.is_dir() else []:
        for stanza in f.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            suites = fields.get("suites", "").split()
            if any("-" not in s for s in suites):
                candidates += fields.get("uris", "").split()
    lists = [Path("/etc/apt/sources.list"), *sorted(srcdir.glob("*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb" and "-" not in words[2]:
                candidates.append(words[1])
    for uri in candidates:
        if "security" not in uri and "/debian" in uri:
            return uri.rstrip("/")
    if candidates:
        return candidates[0].rstrip("/")
    raise LabError(
        "could not find a Debian mirror in /etc/apt/sources.list(.d); "
        "set TLSHD_LAB_MIRROR to a Debian archive URI"
    )


# --------------------------------------------------------------------------- apt


@dataclass
class Apt:
    """apt-get/apt-cache for one Debian suite with private state under the cache dir."""

    root: Path
    mirror: str
    suite: str = SUITE

    @property
    def opts(self) -> list[str]:
        r = self.root
        return [
            "-o", f"Dir::Etc::SourceList={r / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={r / 'lists'}",
            "-o", f"Dir::State::status={r / 'status'}",
            "-o", f"Dir::Cache={r / 'cache'}",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip

    def setup(self) -> None:
        for d in ("lists/partial", "cache/archives/partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        line = f"deb [signed-by={keyring}] {self.mirror} {self.suite} main\n"
        src = self.root / "sources.list"
        if not src.exists() or src.read_text() != line:
            src.write_text(line)
            for f in (self.root / "lists").glob("*_Packages*"):
                f.unlink()

    def have_lists(self) -> bool:
        pattern = f"*_dists_{self.suite}_main_binary-amd64_Packages*"
        return any((self.root / "lists").glob(pattern))

    def update(self) -> None:
        log(f"apt-get update ({self.suite}, private lists in {self.root})")
        p = subprocess.run(["apt-get", *self.opts, "update"], capture_output=True, text=True,
                           check=False)  # fmt: skip
        if p.returncode != 0 or not self.have_lists():
            raise LabError(
                f"cannot fetch the Debian {self.suite} package lists from {self.mirror} "
                f"(no network to the Debian archive?)\n{(p.stdout + p.stderr)[-2000:]}"
            )

    def kernel_candidates(self, pattern: re.Pattern[str] = K612.pattern) -> list[tuple[str, str]]:
        """(package, version) of the kernel images matching ``pattern``, oldest first."""
        p = run(["apt-cache", *self.opts, "pkgnames", "linux-image-"])
        names = sorted((n for n in p.stdout.split() if pattern.match(n)), key=_kernel_sort_key)
        out = []
        for n in names:
            m = re.search(r"^Version: (\S+)", self.show(n), re.M)
            if m:
                out.append((n, m.group(1)))
        return out

    def show(self, pkg: str) -> str:
        return run(["apt-cache", *self.opts, "show", "--no-all-versions", pkg]).stdout

    def download(self, pkg: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        try:
            run(["apt-get", *self.opts, "download", pkg], cwd=dest)
        except LabError as e:
            raise LabError(f"cannot download {pkg} from {self.mirror}: {e}") from e
        debs = sorted(dest.glob(f"{pkg}_*.deb"))
        if not debs:
            raise LabError(f"apt-get download {pkg} produced no .deb in {dest}")
        return debs[-1]


def _kernel_sort_key(pkg: str) -> tuple[int, ...]:
    """Numeric order of kernel package names: 7.2.12 after 7.2.9, deb13u2 after deb13."""
    m = re.search(r"-([0-9]+)\.([0-9]+)\.([0-9]+)\+deb([0-9]+)(?:u([0-9]+))?-", pkg)
    return tuple(int(n or 0) for n in m.groups()) if m else ()


def _companions(apt: Apt, pkg: str) -> list[str]:
    """The split packages a 7.x image meta package depends on, for the same kernel.

    Debian's linux-image-VERSION has been a meta package since 7.x: the kernel
    is in linux-binary-VERSION, the modules in linux-modules-VERSION, config and
    modules.builtin* (which depmod needs to know builtins) in linux-base-VERSION.
    A 6.12 image package holds everything itself and has no such dependencies."""
    uname = re.sub(r"-unsigned$", "", pkg.removeprefix("linux-image-"))
    depends = re.search(r"^Depends: (.*)$", apt.show(pkg), re.M)
    names = re.findall(r"(?:^|[,|]\s*)([a-z0-9][a-z0-9.+-]*)", depends.group(1) if depends else "")
    want = re.compile(r"^linux-(binary|modules|base)-" + re.escape(uname) + "$")
    return sorted({n for n in names if want.match(n)})


# --------------------------------------------------------------------------- stages


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _use_lock_file(stage: Path) -> Path:
    """The lock a guest run holds (shared) on a stage it boots from."""
    return stage / ".use.lock" if stage.is_dir() else stage.with_name(stage.name + ".use.lock")


def hold_stage(stage: Path) -> IO[str]:
    """Take a shared "in use" lock on ``stage`` until the returned file is closed.

    ensure_image() takes it while it still holds the cache lock, so no prune can
    slip in between; a prune by another build then skips the stage (see _in_use)
    instead of deleting a root under a running guest."""
    fh = open(_use_lock_file(stage), "a")  # noqa: SIM115 - held beyond this function
    fcntl.flock(fh, fcntl.LOCK_SH)
    return fh


def _in_use(stage: Path) -> bool:
    lock = _use_lock_file(stage)
    if not lock.exists():
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _remove_stage(stage: Path) -> bool:
    """Delete a stage unless a guest run holds it; True if it was deleted."""
    if _in_use(stage):
        log(f"keeping old {stage.name}: a guest run is using it (pruned by a later build)")
        return False
    log(f"pruning old {stage.name}")
    if stage.is_dir():
        shutil.rmtree(stage, ignore_errors=True)
    else:
        stage.unlink(missing_ok=True)
        _use_lock_file(stage).unlink(missing_ok=True)
    return True


def _done(path: Path) -> bool:
    return (path / ".done").is_file()


def _fresh_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path, meta: dict) -> None:
    (tmp / ".done").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@dataclass
class Kernel:
    dir: Path
    version: str  # uname -r

    @property
    def vmlinuz(self) -> Path:
        boot = self.dir / "boot" / f"vmlinuz-{self.version}"
        # linux-binary-7.x packages put it beside the modules
        return boot if boot.is_file() else self.modules / "vmlinuz"

    @property
    def modules(self) -> Path:
        return self.dir / "lib" / "modules" / self.version


def _kernel_flavour(kernel_dir_name: str) -> KernelFlavour | None:
    """The flavour a ``kernel-<package>_<version>`` cache directory belongs to."""
    pkg = kernel_dir_name.removeprefix("kernel-").split("_", 1)[0]
    return next((f for f in KERNEL_FLAVOURS if f.pattern.match(pkg)), None)


def _prune_kernels(cache: Path, flavour: KernelFlavour, keep: Path) -> None:
    """Drop older kernels of ``flavour``; other flavours' kernels stay."""
    for p in cache.glob("kernel-*"):
        same_flavour = _kernel_flavour(p.name.removesuffix(".tmp")) is flavour
        if same_flavour and p.is_dir() and p != keep and p.name != keep.name + ".tmp":
            _remove_stage(p)


def build_kernel(cache: Path, apt: Apt, refresh: bool = False,
                 flavour: KernelFlavour = K612) -> Kernel:  # fmt: skip
    """The newest kernel of ``flavour`` (pinned in ``flavour.pin`` until ``refresh``)."""
    pin = cache / flavour.pin
    if not refresh and pin.is_file():
        info = json.loads(pin.read_text())
        kdir = cache / info["dir"]
        if _done(kdir):
            return Kernel(kdir, info["version"])
    updated = refresh or not apt.have_lists()
    if updated:
        apt.update()
    while True:
        cands = apt.kernel_candidates(flavour.pattern)
        if not cands:
            raise LabError(f"no package matching {flavour.pattern.pattern} in Debian {apt.suite}")
        pkg, ver = cands[-1]
        kdir = cache / f"kernel-{pkg}_{ver}"
        if _done(kdir):
            break
        t0 = time.monotonic()
        log(f"fetching kernel {pkg} {ver} ({apt.suite})")
        try:
            debs = [apt.download(name, cache / "debs-kernel")
                    for name in (pkg, *_companions(apt, pkg))]  # fmt: skip
        except LabError:
            if updated:
                raise
            log("download failed with the stored package lists: refreshing them")
            apt.update()
            updated = True
            continue
        tmp = _fresh_dir(kdir)
        for deb in debs:
            run(["dpkg-deb", "-x", deb, tmp])
        if not (tmp / "lib").exists() and (tmp / "usr" / "lib" / "modules").is_dir():
            (tmp / "lib").symlink_to("usr/lib")  # merged-/usr package, for depmod -b
        versions = [p.name for p in (tmp / "lib" / "modules").iterdir()]
        if len(versions) != 1:
            raise LabError(f"unexpected module trees in {[d.name for d in debs]}: {versions}")
        kernel = Kernel(tmp, versions[0])
        if not kernel.vmlinuz.is_file():
            raise LabError(f"no vmlinuz in {[d.name for d in debs]}")
        if not (kernel.modules / "modules.builtin").is_file():
            raise LabError(f"no modules.builtin in {[d.name for d in debs]}")
        run(["depmod", "-b", tmp, versions[0]])
        _commit_dir(tmp, kdir, {"package": pkg, "version": ver, "uname": versions[0],
                                "debs": [d.name for d in debs]})  # fmt: skip
        for deb in debs:
            deb.unlink()
        log(f"kernel ready in {time.monotonic() - t0:.0f}s")
        break
    uname = json.loads((kdir / ".done").read_text())["uname"]
    pin.write_text(json.dumps({"dir": kdir.name, "version": uname, "package": pkg}) + "\n")
    _prune_kernels(cache, flavour, kdir)
    return Kernel(kdir, uname)


def build_base(cache: Path, mirror: str, extra: Iterable[str] = (),
               spec: RootSpec = TRIXIE_ROOT) -> Path:  # fmt: skip
    pkgs = sorted(set(spec.packages) | set(extra))
    key = _hash("base", spec.suite, pkgs)
    bdir = cache / f"base-{key}"
    if _done(bdir):
        return bdir
    t0 = time.monotonic()
    log(f"debootstrap {spec.suite} ({len(pkgs)} packages) into {bdir}")
    tmp = _fresh_dir(bdir)
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--cache-dir={debs}",
        "--include=" + ",".join(pkgs),
        spec.suite,
        tmp / "root",
        mirror,
    ]
    if spec.script:
        cmd.append(Path("/usr/share/debootstrap/scripts") / spec.script)
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-3000:]
        logf = tmp / "root" / "debootstrap" / "debootstrap.log"
        if logf.is_file():
            tail += "\n--- debootstrap.log ---\n" + logf.read_text(errors="replace")[-3000:]
        raise LabError(f"debootstrap failed (network to {mirror}?):\n{tail}")
    _commit_dir(tmp, bdir, {"suite": spec.suite, "packages": pkgs})
    log(f"base root ready in {time.monotonic() - t0:.0f}s")
    return bdir


def project_requirements() -> list[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(data["project"]["dependencies"])


def build_wheels(cache: Path, requirements: Sequence[str], python: str = GUEST_PYTHON) -> Path:
    key = _hash("wheels", python, WHEEL_PLATFORMS, sorted(requirements))
    wdir = cache / f"wheels-{key}"
    if _done(wdir):
        return wdir
    log(f"downloading wheels for cp{python.replace('.', '')}: {' '.join(requirements)}")
    tmp = _fresh_dir(wdir)
    plat: list[str] = []
    for p in WHEEL_PLATFORMS:
        plat += ["--platform", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_FIND_LINKS")}
    pip = [sys.executable, "-m", "pip"]
    for req in requirements:
        cmd = [
            *pip, "download", "--only-binary=:all:", "--python-version", python,
            "--implementation", "cp", *plat, "-d", str(tmp), req,
        ]  # fmt: skip
        try:
            run(cmd, env=env)
        except LabError as e:
            # No wheel on the index (e.g. a pure-Python sdist): build one here.
            log(f"no binary wheel for {req}: building a wheel from its sdist")
            try:
                run([*pip, "wheel", "--no-deps", "-w", str(tmp), req], env=env)
            except LabError as e2:
                raise LabError(
                    f"cannot get a wheel of {req} for the guest (PyPI reachable?):\n{e}\n{e2}"
                ) from e2
        for w in tmp.glob("*.whl"):
            if "-none-any" not in w.name and "cp3" not in w.name and "abi3" not in w.name:
                raise LabError(f"{w.name} is not usable by the guest's CPython {python}")
    _commit_dir(tmp, wdir, {"requirements": list(requirements), "python": python})
    return wdir


def _chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
    }
    return run(["chroot", str(root), *cmd], env=env)


def build_root(cache: Path, base: Path, kernel: Kernel | Sequence[Kernel], wheels: Path) -> Path:
    """A guest root: base + the modules of ``kernel`` (one or more) + the venv."""
    kernels = [kernel] if isinstance(kernel, Kernel) else sorted(kernel, key=lambda k: k.dir.name)
    kernel_names = [k.dir.name for k in kernels]
    # one kernel: the key (and so the cached root) of the single-kernel recipe
    kernel_key: str | list[str] = kernel_names[0] if len(kernels) == 1 else kernel_names
    key = _hash("root", ROOT_RECIPE, base.name, kernel_key, wheels.name)
    rdir = cache / f"root-{key}"
    if _done(rdir):
        return rdir
    t0 = time.monotonic()
    log(f"assembling guest root {rdir.name} (base + kernel modules + venv)")
    tmp = _fresh_dir(rdir)
    root = tmp / "root"
    run(["cp", "-a", "--reflink=auto", base / "root", root])
    # kernel modules for the guest's modprobe (one root can serve several kernels)
    mods = root / "usr" / "lib" / "modules"
    mods.mkdir(parents=True, exist_ok=True)
    for k in kernels:
        run(["cp", "-a", k.modules, mods / k.version])
        (mods / k.version / "vmlinuz").unlink(missing_ok=True)  # boots from the cache copy
        _chroot(root, "depmod", k.version)
    # the project's dependencies, installed offline into a venv
    wdst = root / "opt" / "tlshd-wheels"
    shutil.copytree(wheels, wdst, ignore=shutil.ignore_patterns(".done"))
    _chroot(root, "python3", "-m", "venv", GUEST_VENV)
    reqs = json.loads((wheels / ".done").read_text())["requirements"]
    _chroot(
        root,
        f"{GUEST_VENV}/bin/pip",
        "install",
        "--no-index",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--find-links",
        "/opt/tlshd-wheels",
        *reqs,
    )
    # static guest configuration
    (root / "etc" / "hostname").write_text("tlshd-lab\n")
    (root / "etc" / "hosts").write_text(
        "127.0.0.1 localhost tlshd-lab\n::1 localhost ip6-localhost\n127.0.0.99 wrongname\n"
    )
    (root / "etc" / "fstab").write_text("")
    # the workers' own account, as docs/operations.md says to create it
    _chroot(
        root, "useradd", "--system", "--user-group", "--no-create-home",
        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "tlshd",
    )  # fmt: skip
    for d in ("lab/run", "lab/results", "lab/src", "srv/nfs", "mnt/a", "mnt/b", "etc/tlshd"):
        (root / d).mkdir(parents=True, exist_ok=True)
    frozen = _chroot(root, f"{GUEST_VENV}/bin/pip", "freeze", "--all").stdout
    (tmp / "pip-freeze.txt").write_text(frozen)
    _commit_dir(
        tmp,
        rdir,
        {
            "base": base.name,
            "kernel": kernel_names[0],
            "kernels": kernel_names,
            "wheels": wheels.name,
            "recipe": ROOT_RECIPE,
        },
    )
    log(f"guest root ready in {time.monotonic() - t0:.0f}s")
    return rdir


def _module_closure(kernel: Kernel, wanted: Sequence[str]) -> list[Path]:
    """Module files (relative to the module dir) in load order, builtins skipped."""
    mdir = kernel.modules
    builtin = {
        Path(line.strip()).name.split(".")[0].replace("-", "_")
        for line in (mdir / "modules.builtin").read_text().splitlines()
    }
    deps: dict[str, list[str]] = {}
    byname: dict[str, str] = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        byname[Path(mod).name.split(".")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for w in wanted:
        n = w.replace("-", "_")
        if n in builtin:
            continue
        if n not in byname:
            raise LabError(f"kernel {kernel.version} has no module {w}")
        visit(byname[n])
    return [Path(m) for m in order]


def build_initramfs(cache: Path, kernel: Kernel) -> Path:
    init = (LAB / "guest" / "init").read_bytes()
    busybox = Path("/bin/busybox").read_bytes()
    key = _hash("initramfs", kernel.dir.name, hashlib.sha256(init).hexdigest(),
                hashlib.sha256(busybox).hexdigest(), INITRAMFS_MODULES)  # fmt: skip
    # The default flavour keeps the historical name initramfs-<key>.cpio.gz; others
    # carry their flavour (initramfs-k7-<key>.cpio.gz) so that each prunes only its own.
    flavour = _kernel_flavour(kernel.dir.name)
    tag = "" if flavour in (K612, None) else f"k{flavour.name}-"
    out = cache / f"initramfs-{tag}{key}.cpio.gz"
    if out.is_file():
        return out
    log(f"building {out.name}")
    with tempfile.TemporaryDirectory(dir=cache) as td:
        t = Path(td)
        for d in ("bin", "dev", "proc", "sys", "lower", "upper", "newroot", "modules"):
            (t / d).mkdir()
        shutil.copy2("/bin/busybox", t / "bin" / "busybox")
        (t / "init").write_bytes(init)
        (t / "init").chmod(0o755)
        names = []
        for rel in _module_closure(kernel, INITRAMFS_MODULES):
            src = kernel.modules / rel
            name = src.name.removesuffix(".xz").removesuffix(".zst")
            data = src.read_bytes()
            if src.suffix == ".xz":
                data = lzma.decompress(data)
            elif src.suffix == ".zst":
                data = run(["zstd", "-dc", src], stdout=subprocess.PIPE, text=False).stdout
            (t / "modules" / name).write_bytes(data)
            names.append(name)
        (t / "modules" / "order").write_text("\n".join(names) + "\n")
        files = run(["find", "."], cwd=t).stdout
        cpio = run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=t, input=files.encode(),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False).stdout  # fmt: skip
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(cpio, compresslevel=6))
        tmp.rename(out)
    for old in cache.glob(f"initramfs-{tag}*.cpio.gz"):
        if old != out and re.fullmatch(rf"initramfs-{tag}[0-9a-f]{{16}}\.cpio\.gz", old.name):
            _remove_stage(old)
    return out


def _root_kernels(meta: dict) -> list[str]:
    return list(meta.get("kernels") or [meta.get("kernel")])


def _prune_roots(cache: Path, kernels: Sequence[Kernel], keep: Path) -> None:
    """Drop guest roots made stale by this build: those made from an older kernel of
    a flavour this root holds, and those made from the same base and kernels by an
    older recipe or wheel set.  Other profiles' and variants' roots stay."""
    current = json.loads((keep / ".done").read_text())
    mine = {k.dir.name for k in kernels}
    flavours = {_kernel_flavour(name) for name in mine}
    for p in cache.glob("root-*"):
        if p == keep or not _done(p):
            continue
        meta = json.loads((p / ".done").read_text())
        theirs = _root_kernels(meta)
        old_kernel = any(k not in mine and _kernel_flavour(k) in flavours for k in theirs)
        same_lineage = meta.get("base") == current["base"] and set(theirs) == mine
        if old_kernel or same_lineage:
            _remove_stage(p)


@dataclass
class LabImage:
    kernel: Kernel
    root: Path  # the guest's root directory (shared read-only over 9p)
    initramfs: Path
    build_seconds: float
    profile: str = DEFAULT_PROFILE
    # shared "in use" locks on the kernel, root and initramfs (see hold_stage)
    held: list[IO[str]] = field(default_factory=list, repr=False)

    @property
    def vmlinuz(self) -> Path:
        return self.kernel.vmlinuz

    def release(self) -> None:
        """Let later builds prune this image's stages again (after the guest ran)."""
        while self.held:
            self.held.pop().close()


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise LabError(f"unknown lab image {name!r}; known: {', '.join(PROFILES)}") from None


def ensure_image(extra_packages: Iterable[str] = (), refresh: bool = False,
                 image: str = DEFAULT_PROFILE) -> LabImage:  # fmt: skip
    """Build (or reuse) every cached stage of profile ``image`` and return it bootable.

    ``extra_packages`` are Debian packages of the profile's root suite, added to
    the root (a separately cached variant)."""
    profile = profile_named(image)
    t0 = time.monotonic()
    check_root()
    ensure_host_tools()
    cache = cache_dir()
    check_disk(cache)
    with cache_lock(cache):
        mirror = debian_mirror()
        apts: dict[str, Apt] = {}
        kernels: dict[str, Kernel] = {}
        for flavour in (profile.kernel, *profile.root_kernels):
            if flavour.name in kernels:
                continue
            if flavour.suite not in apts:
                # the default suite keeps its historical lists directory "apt/"
                sub = "apt" if flavour.suite == SUITE else f"apt-{flavour.suite}"
                apts[flavour.suite] = Apt(cache / sub, mirror, flavour.suite)
                apts[flavour.suite].setup()
            kernels[flavour.name] = build_kernel(cache, apts[flavour.suite], refresh, flavour)
        base = build_base(cache, mirror, extra_packages, profile.root)
        wheels = build_wheels(cache, project_requirements(), profile.root.python)
        root_kernels = [kernels[f.name] for f in profile.root_kernels]
        root = build_root(cache, base, root_kernels, wheels)
        kernel = kernels[profile.kernel.name]
        initramfs = build_initramfs(cache, kernel)
        _prune_roots(cache, root_kernels, root)
        held = [hold_stage(stage) for stage in (kernel.dir, root, initramfs)]
    return LabImage(kernel, root / "root", initramfs, time.monotonic() - t0, profile.name, held)
