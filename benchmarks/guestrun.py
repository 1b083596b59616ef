"""One lab boot that runs a guest-side benchmark script, for the benchmarks
that need nothing more (startup.py, ready_floor.py): the common options, the
boot, and where the results go."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.burst import wait_for_quiet_host  # noqa: E402
from tests.lab.vm import run_guest  # noqa: E402

HERE = Path(__file__).resolve().parent


def lab_arguments(description: str, runs: int) -> argparse.ArgumentParser:
    """--runs, --image, --out and --no-wait; the caller may add more."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--image", default="trixie", help="lab image: trixie (6.12) or forky (7.x)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="JSON output directory")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other QEMUs")
    return ap


def run_in_guest(
    name: str,
    guest_script: str,
    env: dict[str, str],
    args: argparse.Namespace,
    report: Callable[[dict], str],
) -> int:
    """Boot the guest once with benchmarks/<guest_script> as its scenario.  The
    /lab/results/<name>.json it writes, with the image added, is saved as
    <out>/<name>-<time>.json and printed through `report`.  Exit status: 1 if
    the guest wrote no results or failed."""
    if not args.no_wait:
        wait_for_quiet_host()
    results = Path(tempfile.mkdtemp(prefix=f"tlshd-{name}-"))
    started = time.strftime("%Y%m%d-%H%M%S")
    script = (HERE / guest_script).read_text()
    res = run_guest(script, daemon="ours", timeout=1800, results_dir=results, env=env,
                    image=args.image)  # fmt: skip
    raw = results / f"{name}.json"
    if not raw.is_file():
        print(f"no results (rc={res.returncode}); see {res.console_log}", file=sys.stderr)
        return 1
    doc = json.loads(raw.read_text())
    doc["image"] = args.image
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{name}-{started}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(report(doc))
    print(f"raw results: {out}; guest files: {results}")
    return 0 if res.returncode == 0 else 1
