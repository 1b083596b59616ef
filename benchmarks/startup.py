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

import argparse
import json
import statistics
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--image", default="trixie", help="lab image: trixie (6.12) or forky (7.x)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="JSON output directory")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other QEMUs")
    args = ap.parse_args(argv)
    if not args.no_wait:
        wait_for_quiet_host()
    results = Path(tempfile.mkdtemp(prefix="tlshd-startup-"))
    started = time.strftime("%Y%m%d-%H%M%S")
    script = (HERE / "guest_startup.py").read_text()
    res = run_guest(script, daemon="ours", timeout=1800, results_dir=results,
                    env={"STARTUP_RUNS": str(args.runs)}, image=args.image)  # fmt: skip
    raw = results / "startup.json"
    if not raw.is_file():
        print(f"no results (rc={res.returncode}); see {res.console_log}", file=sys.stderr)
        return 1
    doc = json.loads(raw.read_text())
    doc["image"] = args.image
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"startup-{started}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(report(doc))
    print(f"raw results: {out}; guest files: {results}")
    return 0 if res.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
