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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guestrun import lab_arguments, run_in_guest


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
    args = lab_arguments(__doc__.split("\n\n")[0], runs=5).parse_args(argv)
    return run_in_guest("ready-floor", "guest_ready_floor.py",
                        {"READY_FLOOR_RUNS": str(args.runs)}, args, report)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
