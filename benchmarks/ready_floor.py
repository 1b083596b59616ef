#!/usr/bin/env python3
"""Where the time to READY goes: the floor under it, then the daemon's own part.

Boots the lab guest once and runs benchmarks/guest_ready_floor.py in it: the
interpreter's start, `import OpenSSL.SSL` alone, the daemon's imports up to
the zygote's ready, and the zygote's start-up steps one by one, each in a
fresh interpreter, RUNS times.

    sudo python3 benchmarks/ready_floor.py [--runs 5] [--image trixie|forky]

Prints the median and range of each; writes benchmarks/results/ready-floor-*.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.burst import wait_for_quiet_host  # noqa: E402
from tests.lab.vm import run_guest  # noqa: E402

HERE = Path(__file__).resolve().parent


def report(doc: dict) -> str:
    lines = [
        f"kernel {doc['kernel']}, Python {doc['python']}, {doc['runs']} runs",
        "| step | median | range |",
        "|---|---|---|",
    ]
    for name, values in doc["timings_s"].items():
        lines.append(
            f"| {name} | {doc['medians_s'][name]:.3f} s | {min(values):.3f}-{max(values):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default="trixie", help="lab image: trixie (6.12) or forky (7.x)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="JSON output directory")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other QEMUs")
    args = ap.parse_args(argv)
    if not args.no_wait:
        wait_for_quiet_host()
    results = Path(tempfile.mkdtemp(prefix="tlshd-ready-floor-"))
    started = time.strftime("%Y%m%d-%H%M%S")
    script = (HERE / "guest_ready_floor.py").read_text()
    res = run_guest(script, daemon="ours", timeout=1800, results_dir=results,
                    env={"READY_FLOOR_RUNS": str(args.runs)}, image=args.image)  # fmt: skip
    raw = results / "ready_floor.json"
    if not raw.is_file():
        print(f"no results (rc={res.returncode}); see {res.console_log}", file=sys.stderr)
        return 1
    doc = json.loads(raw.read_text())
    doc["image"] = args.image
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"ready-floor-{started}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(report(doc))
    print(f"raw results: {out}; guest files: {results}")
    return 0 if res.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
