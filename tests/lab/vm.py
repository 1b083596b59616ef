"""Boot the lab guest and run a script in it: :func:`run_guest`.

Example::

    from tests.lab.vm import run_guest
    res = run_guest('''
        lab nfs-server                # helpers from guest/labguest.py
        lab start-daemon              # ours or upstream, per daemon=
        mount -t nfs4 -o vers=4.2,xprtsec=tls 127.0.0.1:/ /mnt/a && echo ok > /lab/results/x
    ''', daemon="ours", timeout=300)
    assert res.returncode == 0, res.console_log.read_text()

Each run gets a fresh wheel of the working tree (installed into the guest's
venv ``/opt/tlshd`` at boot), a read-only "run" share (``/lab/run``: the
script, the guest helpers, the wheel) and a read-write results share
(``/lab/results``) that comes back as ``GuestResult.results_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab.build import (
    DEFAULT_PROFILE,
    LAB,
    PROFILES,
    REPO,
    LabError,
    LabImage,
    ensure_image,
    log,
    run,
)

GUEST_DIR = LAB / "guest"
DAEMONS = ("ours", "upstream")
IMAGES = tuple(PROFILES)  # "trixie" (default), "forky", "forky-6.12"; see build.PROFILES
# The images every scenario suite runs on, and the daemons on each.  Upstream is
# the reference where it works: 1.0.0 on trixie, 1.4.0 on forky; on forky-6.12
# upstream 1.4.0 fails every handshake (test_upstream_rsl.py proves it), so only
# ours runs the suites there, and only in the full run (TLSHD_LAB_FULL=1,
# scripts/test.sh --full); see tests/lab/README.md for the CI time budget.
SUITE_RUNS: tuple[tuple[str, str], ...] = (
    ("trixie", "ours"),
    ("trixie", "upstream"),
    ("forky", "ours"),
    ("forky", "upstream"),
)
FULL_ONLY_RUNS: tuple[tuple[str, str], ...] = (("forky-6.12", "ours"),)


def full_run() -> bool:
    """True when the whole lab matrix is asked for (TLSHD_LAB_FULL=1)."""
    return os.environ.get("TLSHD_LAB_FULL", "0") not in ("", "0")


def suite_runs(daemons: Iterable[str] = DAEMONS) -> list[tuple[str, str]]:
    """(image, daemon) pairs a scenario suite is parametrized over."""
    runs = [*SUITE_RUNS, *(FULL_ONLY_RUNS if full_run() else ())]
    wanted = set(daemons)
    return [r for r in runs if r[1] in wanted]


def results_subdir(image: str, name: str) -> str:
    """Per-run results directory name: the default image keeps the bare name."""
    return name if image == DEFAULT_PROFILE else f"{image}-{name}"


@dataclass
class GuestResult:
    """What a guest run brought back."""

    returncode: int | None  # the script's exit status; None if the guest never finished it
    results_dir: Path  # the guest's /lab/results (scenario.log, dmesg.txt, trace.txt, ...)
    console_log: Path  # the serial console (kernel + stage 2 + script output)
    seconds: float = 0.0  # wall time of the boot-to-poweroff
    timed_out: bool = False
    build_seconds: float = 0.0  # time spent making sure the cached image is current
    timings: dict[str, float] = field(default_factory=dict)
    image: str = DEFAULT_PROFILE  # the image profile that booted
    kernel: str = ""  # its kernel's uname -r

    def text(self, name: str) -> str:
        p = self.results_dir / name
        return p.read_text(errors="replace") if p.is_file() else ""

    def scenario(self, name: str) -> dict | None:
        p = self.results_dir / "scenarios" / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def scenarios(self) -> dict[str, dict]:
        d = self.results_dir / "scenarios"
        return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}


def build_project_wheel(dest: Path) -> Path:
    """A wheel of the working tree as it is now (tracked + untracked, not ignored files)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO
    ).stdout.split("\0")
    with tempfile.TemporaryDirectory(prefix="tlshd-src-") as td:
        src = Path(td) / "src"
        for f in files:
            p = REPO / f
            if f and p.is_file() and not f.startswith("tests/"):
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, src / f)
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
        base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest)]
        try:
            run([*base, "--no-build-isolation", str(src)], env=env)
        except LabError:
            run([*base, str(src)], env=env)  # fetches setuptools into an isolated env
    wheels = sorted(dest.glob("tlshd-*.whl"))
    if not wheels:
        raise LabError(f"no tlshd wheel built in {dest}")
    return wheels[-1]


def _prepare_run_dir(run_dir: Path, script: str, env: Mapping[str, str]) -> None:
    shutil.copytree(GUEST_DIR, run_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "init"))  # fmt: skip
    bindir = run_dir / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "lab").write_text('#!/bin/sh\nexec python3 /lab/run/labguest.py "$@"\n')
    (bindir / "lab").chmod(0o755)
    if not script.lstrip().startswith("#!"):
        script = "#!/bin/sh\nset -x\n" + script
    (run_dir / "scenario").write_text(script.lstrip())
    (run_dir / "scenario").chmod(0o755)
    lines = [f"export {k}='{v}'" for k, v in env.items()]
    (run_dir / "env").write_text("\n".join(lines) + "\n")


def qemu_command(image: LabImage, run_dir: Path, results: Path, *, memory: int = 8192,
                 smp: int = 2, share_src: bool = False, interactive: bool = False,
                 kernel_args: Iterable[str] = ()) -> list[str]:  # fmt: skip
    append = "console=ttyS0 quiet panic=-1 lab.src=" + ("1" if share_src else "0")
    append = " ".join([append, *kernel_args])

    def share(path: Path, tag: str, ro: bool) -> list[str]:
        opt = f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
        return ["-virtfs", opt + (",readonly=on" if ro else "")]

    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory),
        "-smp", str(smp), "-kernel", str(image.vmlinuz), "-initrd", str(image.initramfs),
        "-append", append, "-no-reboot", "-nodefaults", "-net", "none",
        *share(image.root, "root", True), *share(run_dir, "run", True),
        *share(results, "results", False),
    ]  # fmt: skip
    if share_src:
        cmd += share(REPO, "src", True)
    if interactive:
        cmd += ["-nographic", "-serial", "mon:stdio"]
    else:
        cmd += ["-display", "none", "-monitor", "none", "-serial", "stdio"]
    return cmd


def run_guest(
    script: str,
    daemon: str = "ours",
    timeout: int = 600,
    extra_packages: Iterable[str] = (),
    *,
    results_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    interactive: bool = False,
    echo: bool = False,
    memory: int = 8192,
    smp: int = 2,
    share_src: bool = False,
    install_project: bool = True,
    kernel_args: Iterable[str] = (),
    image: str = DEFAULT_PROFILE,
) -> GuestResult:
    """Boot the lab guest once, run ``script`` (sh unless it has a #! line) as root.

    ``daemon`` ("ours" or "upstream") is exported as ``$LAB_DAEMON``; the script
    starts it (``lab start-daemon``) so that it can also kill and restart it.
    ``extra_packages`` are Debian trixie packages added to the guest root (a
    separately cached root variant).  ``timeout`` bounds the whole boot, in
    seconds; the guest is killed after it.  ``echo`` copies the console to
    stderr.  ``share_src`` also mounts the checkout read-only at /lab/src.
    ``kernel_args`` are appended to the kernel command line (e.g.
    ``lab.init=systemd``: boot systemd as PID 1, see guest/systemd-stage2.sh).
    ``image`` picks the image profile (``IMAGES``): "trixie" (6.12 kernel, trixie
    root, upstream 1.0.0), "forky" (newest 7.x kernel, forky root, upstream
    1.4.0) or "forky-6.12" (the forky root on the 6.12 kernel); it is exported
    as ``$LAB_IMAGE``.  ``extra_packages`` come from that profile's suite.
    """
    if daemon not in DAEMONS:
        raise ValueError(f"daemon must be one of {DAEMONS}")
    if image not in IMAGES:
        raise ValueError(f"image must be one of {IMAGES}")
    lab_image = ensure_image(extra_packages, image=image)
    try:  # the image's stages stay held (not prunable by other builds) until QEMU is gone
        results = Path(results_dir) if results_dir else Path(tempfile.mkdtemp(prefix="tlshd-lab-"))
        results.mkdir(parents=True, exist_ok=True)
        console = results / "console.log"
        timings = {"image": round(lab_image.build_seconds, 2)}
        with tempfile.TemporaryDirectory(prefix="tlshd-lab-run-") as td:
            run_dir = Path(td)
            t0 = time.monotonic()
            if install_project:
                build_project_wheel(run_dir / "wheels")
            timings["wheel"] = round(time.monotonic() - t0, 2)
            genv = {"LAB_DAEMON": daemon, "LAB_MODE": "shell" if interactive else "script",
                    "LAB_IMAGE": image}  # fmt: skip
            genv.update(env or {})
            _prepare_run_dir(run_dir, script, genv)
            cmd = qemu_command(lab_image, run_dir, results, memory=memory, smp=smp,
                               share_src=share_src, interactive=interactive,
                               kernel_args=kernel_args)  # fmt: skip
            t0 = time.monotonic()
            timed_out = False
            if interactive:
                subprocess.run(cmd, check=False)
            else:
                for attempt in range(1 + BOOT_PANIC_RETRIES):
                    timed_out = _run_logged(cmd, console, timeout, echo)
                    if not _panicked_before_userspace(console, results):
                        break
                    kept = console.with_name(f"console.boot-panic-{attempt + 1}.log")
                    console.rename(kept)
                    print(f"lab: the guest kernel panicked while booting (see {kept}); "
                          "booting again", file=sys.stderr)  # fmt: skip
            seconds = time.monotonic() - t0
    finally:
        lab_image.release()
    rcfile = results / "rc"
    rc = int(rcfile.read_text().strip()) if rcfile.is_file() else None
    timings["guest"] = round(seconds, 2)
    return GuestResult(rc, results, console, seconds, timed_out, lab_image.build_seconds, timings,
                       image, lab_image.kernel.version)  # fmt: skip


# Under TCG the guest kernel sometimes dies before userspace, e.g. "Oops: int3"
# in sched_clock_cpu while it patches static keys (emulator timing, seen on
# 6.12 and 7.x alike).  Nothing of ours has run then, so the boot is retried.
BOOT_PANIC_RETRIES = 2
USERSPACE_MARK = b"lab: "  # the first line of guest/stage2.sh or systemd-stage2.sh


def _panicked_before_userspace(console: Path, results: Path) -> bool:
    if (results / "rc").is_file():
        return False
    text = console.read_bytes() if console.is_file() else b""
    return b"Kernel panic" in text and USERSPACE_MARK not in text


def _run_logged(cmd: list[str], console: Path, timeout: int, echo: bool) -> bool:
    with open(console, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)  # fmt: skip
        assert proc.stdout is not None

        def pump() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                out.write(line)
                out.flush()
                if echo:
                    sys.stderr.write(line.decode(errors="replace"))
                    sys.stderr.flush()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            log(f"guest still running after {timeout}s: killing QEMU pid {proc.pid}")
            proc.kill()
            proc.wait()
            timed_out = True
        th.join(timeout=5)
    return timed_out
