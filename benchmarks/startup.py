#!/usr/bin/env python3
"""Start-up benchmark: our daemon's time to READY and idle memory, per process.

Boots the lab guest once and runs benchmarks/guest_startup.py in it: N starts
of our daemon, each timed from exec to its "serving handshakes" line (READY),
with the zygote's own step timings, and after 2 s idle every process's
smaps_rollup (PSS, private and shared pages).  This is what explains the
burst benchmark's "ready after" and "PSS idle" columns, in less time.

    sudo python3 benchmarks/startup.py [--runs 8] [--image trixie|forky]

Prints the median and range of READY (the first start of the boot apart: it
also pays for a cold page cache) and the per-process memory of the median
start; writes benchmarks/results/startup-*.json.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.guestrun import lab_arguments, run_in_guest


def report(doc: dict) -> str:
    starts = doc["starts"]
    warm = starts[1:] or starts
    ready = [s["ready_s"] for s in warm]
    forked = [s["zygote_forked_after_s"] for s in warm if s["zygote_forked_after_s"] is not None]
    zygote = [s["zygote_start_s"] for s in warm if s["zygote_start_s"] is not None]
    pss = [s["total_pss_kib"] / 1024 for s in warm]
    lines = [
        f"kernel {doc['kernel']}, Python {doc['python']}, {len(starts)} starts",
        f"first start: READY after {starts[0]['ready_s']:.2f} s (cold page cache)",
        f"others: READY median {statistics.median(ready):.2f} s "
        f"({min(ready):.2f}-{max(ready):.2f}); zygote forked "
        f"{statistics.median(forked):.2f} s after exec and ready "
        f"{statistics.median(zygote):.2f} s later (medians)",
        f"idle PSS of the tree: median {statistics.median(pss):.1f} MiB "
        f"({min(pss):.1f}-{max(pss):.1f})",
    ]
    median_start = sorted(warm, key=lambda s: s["total_pss_kib"])[len(warm) // 2]
    lines.append(f"zygote steps: {median_start['zygote_steps']}")
    lines.append("| process | PSS | private dirty | shared dirty | private clean | shared clean |")
    lines.append("|---|---|---|---|---|---|")
    for proc in median_start["processes"]:
        if "error" in proc:
            continue
        lines.append(
            f"| {proc['title'] or proc['pid']} | {proc['Pss'] / 1024:.1f} MiB "
            f"| {proc['Private_Dirty'] / 1024:.1f} | {proc['Shared_Dirty'] / 1024:.1f} "
            f"| {proc['Private_Clean'] / 1024:.1f} | {proc['Shared_Clean'] / 1024:.1f} |"
        )
    lines.append("")
    lines.append("PSS of each process by mapping, MiB (PSS / private dirty / private clean):")
    for proc in median_start["processes"]:
        top = ", ".join(
            f"{Path(m['mapping']).name or m['mapping']} {m['Pss'] / 1024:.1f}/"
            f"{m['Private_Dirty'] / 1024:.1f}/{m['Private_Clean'] / 1024:.1f}"
            for m in proc.get("mappings", [])[:5]
        )
        lines.append(f"- {proc.get('title') or proc['pid']}: {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = lab_arguments(__doc__.split("\n\n")[0], runs=8).parse_args(argv)
    return run_in_guest("startup", "guest_startup.py", {"STARTUP_RUNS": str(args.runs)}, args,
                        report)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
