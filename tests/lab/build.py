"""Build and cache the real-kernel lab: kernel, guest root filesystem, initramfs.

Everything lands in a cache directory OUTSIDE the checkout (``$TLSHD_LAB_CACHE``,
default ``/var/cache/tlshd-lab``).  Each stage is keyed by a hash of its inputs
and rebuilt only when they change:

=============  ===========================================================
stage          key (inputs)
=============  ===========================================================
apt lists      suite, mirror URI (refreshed only when a stage needs them)
kernel         the resolved ``linux-image-6.12.*-amd64-unsigned`` name/version
base root      suite, debootstrap package list (+ extra packages)
wheels         the project's runtime requirements, guest Python ABI, platforms
root           base + kernel + wheels + ``ROOT_RECIPE`` (modules, venv, config)
initramfs      kernel + init script + busybox binary
=============  ===========================================================

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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = Path(__file__).resolve().parent

SUITE = "trixie"
KERNEL_PATTERN = re.compile(r"^linux-image-6\.12\.[0-9]+\+deb13(u[0-9]+)?-amd64-unsigned$")
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
GUEST_PYTHON = "3.13"
WHEEL_PLATFORMS: tuple[str, ...] = (
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
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


# --------------------------------------------------------------------------- apt (trixie)


@dataclass
class Apt:
    """apt-get/apt-cache for trixie with private state under the cache dir."""

    root: Path
    mirror: str

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
        line = f"deb [signed-by={keyring}] {self.mirror} {SUITE} main\n"
        src = self.root / "sources.list"
        if not src.exists() or src.read_text() != line:
            src.write_text(line)
            for f in (self.root / "lists").glob("*_Packages*"):
                f.unlink()

    def have_lists(self) -> bool:
        return any((self.root / "lists").glob(f"*_dists_{SUITE}_main_binary-amd64_Packages*"))

    def update(self) -> None:
        log(f"apt-get update ({SUITE}, private lists in {self.root})")
        p = subprocess.run(["apt-get", *self.opts, "update"], capture_output=True, text=True,
                           check=False)  # fmt: skip
        if p.returncode != 0 or not self.have_lists():
            raise LabError(
                f"cannot fetch the Debian {SUITE} package lists from {self.mirror} "
                f"(no network to the Debian archive?)\n{(p.stdout + p.stderr)[-2000:]}"
            )

    def kernel_candidates(self) -> list[tuple[str, str]]:
        p = run(["apt-cache", *self.opts, "pkgnames", "linux-image-6.12"])
        names = sorted(n for n in p.stdout.split() if KERNEL_PATTERN.match(n))
        out = []
        for n in names:
            pol = run(["apt-cache", *self.opts, "show", "--no-all-versions", n]).stdout
            m = re.search(r"^Version: (\S+)", pol, re.M)
            if m:
                out.append((n, m.group(1)))
        return out

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


def _prune(cache: Path, prefix: str, keep: Path) -> None:
    for p in cache.glob(prefix + "*"):
        if p != keep and p.name != keep.name + ".tmp":
            log(f"pruning old {p.name}")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@dataclass
class Kernel:
    dir: Path
    version: str  # uname -r

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.dir / "lib" / "modules" / self.version


def build_kernel(cache: Path, apt: Apt, refresh: bool = False) -> Kernel:
    pin = cache / "kernel.json"
    if not refresh and pin.is_file():
        info = json.loads(pin.read_text())
        kdir = cache / info["dir"]
        if _done(kdir):
            return Kernel(kdir, info["version"])
    updated = refresh or not apt.have_lists()
    if updated:
        apt.update()
    while True:
        cands = apt.kernel_candidates()
        if not cands:
            raise LabError(f"no package matching {KERNEL_PATTERN.pattern} in Debian {SUITE}")
        pkg, ver = cands[-1]
        kdir = cache / f"kernel-{pkg}_{ver}"
        if _done(kdir):
            break
        t0 = time.monotonic()
        log(f"fetching kernel {pkg} {ver}")
        try:
            deb = apt.download(pkg, cache / "debs-kernel")
        except LabError:
            if updated:
                raise
            log("download failed with the stored package lists: refreshing them")
            apt.update()
            updated = True
            continue
        tmp = _fresh_dir(kdir)
        run(["dpkg-deb", "-x", deb, tmp])
        if not (tmp / "lib").exists() and (tmp / "usr" / "lib" / "modules").is_dir():
            (tmp / "lib").symlink_to("usr/lib")  # merged-/usr package, for depmod -b
        versions = [p.name for p in (tmp / "lib" / "modules").iterdir()]
        if len(versions) != 1:
            raise LabError(f"unexpected module trees in {deb}: {versions}")
        run(["depmod", "-b", tmp, versions[0]])
        _commit_dir(tmp, kdir, {"package": pkg, "version": ver, "uname": versions[0]})
        deb.unlink()
        log(f"kernel ready in {time.monotonic() - t0:.0f}s")
        break
    uname = json.loads((kdir / ".done").read_text())["uname"]
    pin.write_text(json.dumps({"dir": kdir.name, "version": uname, "package": pkg}) + "\n")
    _prune(cache, "kernel-", kdir)
    return Kernel(kdir, uname)


def build_base(cache: Path, mirror: str, extra: Iterable[str] = ()) -> Path:
    pkgs = sorted(set(BASE_PACKAGES) | set(extra))
    key = _hash("base", SUITE, pkgs)
    bdir = cache / f"base-{key}"
    if _done(bdir):
        return bdir
    t0 = time.monotonic()
    log(f"debootstrap {SUITE} ({len(pkgs)} packages) into {bdir}")
    tmp = _fresh_dir(bdir)
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--cache-dir={debs}",
        "--include=" + ",".join(pkgs),
        SUITE,
        tmp / "root",
        mirror,
    ]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-3000:]
        logf = tmp / "root" / "debootstrap" / "debootstrap.log"
        if logf.is_file():
            tail += "\n--- debootstrap.log ---\n" + logf.read_text(errors="replace")[-3000:]
        raise LabError(f"debootstrap failed (network to {mirror}?):\n{tail}")
    _commit_dir(tmp, bdir, {"suite": SUITE, "packages": pkgs})
    log(f"base root ready in {time.monotonic() - t0:.0f}s")
    return bdir


def project_requirements() -> list[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(data["project"]["dependencies"])


def build_wheels(cache: Path, requirements: Sequence[str]) -> Path:
    key = _hash("wheels", GUEST_PYTHON, WHEEL_PLATFORMS, sorted(requirements))
    wdir = cache / f"wheels-{key}"
    if _done(wdir):
        return wdir
    log(f"downloading wheels for cp{GUEST_PYTHON.replace('.', '')}: {' '.join(requirements)}")
    tmp = _fresh_dir(wdir)
    plat: list[str] = []
    for p in WHEEL_PLATFORMS:
        plat += ["--platform", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_FIND_LINKS")}
    pip = [sys.executable, "-m", "pip"]
    for req in requirements:
        cmd = [
            *pip, "download", "--only-binary=:all:", "--python-version", GUEST_PYTHON,
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
                raise LabError(f"{w.name} is not usable by the guest's CPython {GUEST_PYTHON}")
    _commit_dir(tmp, wdir, {"requirements": list(requirements)})
    return wdir


def _chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
    }
    return run(["chroot", str(root), *cmd], env=env)


def build_root(cache: Path, base: Path, kernel: Kernel, wheels: Path) -> Path:
    key = _hash("root", ROOT_RECIPE, base.name, kernel.dir.name, wheels.name)
    rdir = cache / f"root-{key}"
    if _done(rdir):
        return rdir
    t0 = time.monotonic()
    log(f"assembling guest root {rdir.name} (base + kernel modules + venv)")
    tmp = _fresh_dir(rdir)
    root = tmp / "root"
    run(["cp", "-a", "--reflink=auto", base / "root", root])
    # kernel modules for the guest's modprobe
    mods = root / "usr" / "lib" / "modules"
    mods.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", kernel.modules, mods / kernel.version])
    _chroot(root, "depmod", kernel.version)
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
            "kernel": kernel.dir.name,
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
    out = cache / f"initramfs-{key}.cpio.gz"
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
    _prune(cache, "initramfs-", out)
    return out


def _prune_roots(cache: Path, kernel: Kernel, keep: Path) -> None:
    """Drop guest roots made from another kernel or made stale by a newer recipe."""
    current = json.loads((keep / ".done").read_text())
    for p in cache.glob("root-*"):
        if p == keep or not _done(p):
            continue
        meta = json.loads((p / ".done").read_text())
        if meta.get("kernel") != kernel.dir.name or meta.get("base") == current["base"]:
            log(f"pruning old {p.name}")
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class LabImage:
    kernel: Kernel
    root: Path  # the guest's root directory (shared read-only over 9p)
    initramfs: Path
    build_seconds: float

    @property
    def vmlinuz(self) -> Path:
        return self.kernel.vmlinuz


def ensure_image(extra_packages: Iterable[str] = (), refresh: bool = False) -> LabImage:
    """Build (or reuse) every cached stage and return the bootable image."""
    t0 = time.monotonic()
    check_root()
    ensure_host_tools()
    cache = cache_dir()
    check_disk(cache)
    with cache_lock(cache):
        mirror = debian_mirror()
        apt = Apt(cache / "apt", mirror)
        apt.setup()
        kernel = build_kernel(cache, apt, refresh=refresh)
        base = build_base(cache, mirror, extra_packages)
        wheels = build_wheels(cache, project_requirements())
        root = build_root(cache, base, kernel, wheels)
        initramfs = build_initramfs(cache, kernel)
        _prune_roots(cache, kernel, root)
    return LabImage(kernel, root / "root", initramfs, time.monotonic() - t0)
