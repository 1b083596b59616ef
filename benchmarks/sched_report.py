"""Read a scheduler trace that `burst.py --sched-trace` saved for one burst.

    python3 benchmarks/sched_report.py TRACE [--bins 20] [--bin-ms 100] [--first 3]

TRACE is a guest file `sched-<label>.txt` (or the same, gzipped): tracefs
lines of sched_switch / sched_wakeup (our supervisor's only, or every task's
with `--sched-trace all`), the handshake events and module_request.  Prints,
from the burst's first submission on:

- per bin: how long the supervisor ran, how long it was runnable but not
  running (woken or preempted, until it was switched in), the ACCEPTs, and
  the most requests ever pending (submitted, not yet accepted) in the bin;
- totals, the submissions the kernel refused, who asked for modules, and
  who woke the supervisor (a syslog daemon there means it slept in send());
- with a full trace, the CPU time of each kind of task, and for the first
  `--first` seconds how long each kind ran and waited runnable (the zygote,
  the first tlshd process forked after the supervisor, apart).

The supervisor is recognised by its priority: 115 (nice -5), 100 (nice -20)
or 98 (SCHED_FIFO 1); workers and the zygote run at 120.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys
from pathlib import Path

LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)$")
SWITCH = re.compile(
    r"prev_comm=(.*?) prev_pid=(\d+) prev_prio=(\d+) prev_state=(\S+) ==> "
    r"next_comm=(.*?) next_pid=(\d+) next_prio=(\d+)"
)
SUPERVISOR_PRIOS = {"115", "100", "98"}


def read_events(path: Path) -> list[tuple[float, str, str, str, int]]:
    """(time, event, fields, comm, cpu) of every parsed line, in trace order."""
    opener = gzip.open if path.suffix == ".gz" else open
    events = []
    with opener(path, "rt", errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                events.append((float(m[4]), m[5], m[6], m[1], int(m[3])))
    return events


def supervisor_pid(events: list[tuple[float, str, str, str, int]]) -> str | None:
    for _t, event, fields, _comm, _cpu in events:
        m = SWITCH.search(fields) if event == "sched_switch" else None
        if m and m[5].startswith("tlshd") and m[7] in SUPERVISOR_PRIOS:
            return m[6]
    return None


def kind(comm: str, pid: str, supervisor: str | None) -> str:
    if pid == supervisor:
        return "supervisor"
    for prefix in ("swapper", "tlshd", "modprobe", "mount", "kworker", "nfsd", "scenario"):
        if comm.startswith(prefix):
            return {"swapper": "idle", "tlshd": "workers+zygote"}.get(prefix, prefix)
    return "other"


def first_seconds(events: list[tuple[float, str, str, str, int]], t0: float, sup: str | None,
                  window_s: float) -> None:  # fmt: skip
    """Ran / runnable-waiting per kind of task in [t0, t0 + window_s)."""
    zygote = str(int(sup) + 1) if sup else None
    ran: collections.Counter[str] = collections.Counter()
    waited: collections.Counter[str] = collections.Counter()
    on: dict[str, tuple[str, float]] = {}
    woke: dict[str, float] = {}
    for t, event, fields, _comm, _cpu in events:
        rel = t - t0
        if rel >= window_s:
            break
        if event == "sched_wakeup":
            m = re.search(r"comm=(.*?) pid=(\d+) ", fields)
            if m:
                woke.setdefault(m[2], rel)
            continue
        m = SWITCH.search(fields) if event == "sched_switch" else None
        if m is None:
            continue
        prev, nxt = m[2], m[6]
        if prev in on:
            who, since = on.pop(prev)
            ran[who] += max(rel, 0.0) - max(since, 0.0)
        if m[4].startswith("R"):
            woke[prev] = rel
        who = "zygote" if nxt == zygote else kind(m[5], nxt, sup)
        on[nxt] = (who, rel)
        if nxt in woke:
            since = woke.pop(nxt)
            waited[who] += max(rel, 0.0) - max(since, 0.0)
    print(f"first {window_s:g} s, ran / waited runnable: " + ", ".join(
        f"{k} {ran[k]:.2f} / {waited[k]:.2f} s" for k, _ in ran.most_common()
    ))  # fmt: skip


def report(path: Path, bins: int, bin_s: float, window_s: float = 0.0) -> None:
    events = read_events(path)
    submits = [t for t, e, *_ in events if e == "handshake_submit"]
    if not submits:
        sys.exit(f"{path}: no handshake_submit event")
    t0 = min(submits)
    sup = supervisor_pid(events)
    run: collections.Counter[int] = collections.Counter()
    wait: collections.Counter[int] = collections.Counter()
    accepts: collections.Counter[int] = collections.Counter()
    peak_pending: dict[int, int] = {}
    use: collections.Counter[str] = collections.Counter()
    current: dict[int, tuple[str, float]] = {}
    on_since = runnable_since = None
    pending = 0
    modules: collections.Counter[str] = collections.Counter()
    wakers: collections.Counter[str] = collections.Counter()
    refused = 0
    full = False  # a switch between two other tasks: every task's switches were traced
    for t, event, fields, comm, cpu in events:
        rel = t - t0
        b = int(rel // bin_s)
        if event == "handshake_submit":
            pending += 1
        elif event == "handshake_cmd_accept":
            pending -= 1
            accepts[b] += 1
        elif event == "handshake_submit_err":
            refused += 1
        elif event == "module_request":
            name = fields.split()[0] if fields else "?"
            who = "tlshd" if comm.startswith("tlshd") else comm.split("-")[0]
            modules[f"{who}: {name}"] += 1
        elif event == "sched_wakeup" and f"pid={sup} " in fields + " ":
            runnable_since = rel if runnable_since is None else runnable_since
            if rel >= 0:
                wakers[comm.split("/")[0]] += 1
        elif event == "sched_switch":
            m = SWITCH.search(fields)
            if m is None:
                continue
            full = full or sup not in (m[2], m[6])
            if cpu in current and rel >= 0:
                who, since = current[cpu]
                use[who] += rel - max(since, 0.0)
            current[cpu] = (kind(m[5], m[6], sup), rel)
            if m[2] == sup and on_since is not None:
                run[int(on_since // bin_s)] += rel - on_since
                on_since = None
                if m[4].startswith("R"):
                    runnable_since = rel
            elif m[6] == sup:
                on_since = rel
                if runnable_since is not None:
                    wait[int(runnable_since // bin_s)] += rel - runnable_since
                    runnable_since = None
        if rel >= 0:
            peak_pending[b] = max(peak_pending.get(b, 0), pending)
    print(f"{path.name}: supervisor pid {sup}, first submission at {t0:.3f}")
    print(f"{'from':>7} {'run ms':>7} {'waiting ms':>10} {'accepts':>7} {'peak pending':>12}")
    for b in range(bins):
        print(
            f"{b * bin_s:6.1f}s {run[b] * 1000:7.0f} {wait[b] * 1000:10.0f} "
            f"{accepts[b]:7d} {peak_pending.get(b, 0):12d}"
        )
    print(
        f"whole burst: supervisor ran {sum(run.values()):.2f} s, runnable but waiting "
        f"{sum(wait.values()):.2f} s; {sum(accepts.values())} ACCEPTs, "
        f"{refused} submissions refused, most pending {max(peak_pending.values(), default=0)}"
    )
    if modules:
        print("module requests: " + ", ".join(f"{k} x{n}" for k, n in modules.most_common()))
    if wakers:
        print("supervisor woken by: " + ", ".join(f"{k} x{n}" for k, n in wakers.most_common(6)))
    if full:  # every CPU's time by kind of task
        total = sum(use.values())
        print("CPU time by task, whole trace: " + ", ".join(
            f"{k} {v:.2f} s ({v / total:.0%})" for k, v in use.most_common()
        ))  # fmt: skip
        if window_s > 0:
            first_seconds(events, t0, sup, window_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--bin-ms", type=float, default=100.0)
    ap.add_argument("--first", type=float, default=0.0, help="seconds (full traces)")
    args = ap.parse_args(argv)
    report(args.trace, args.bins, args.bin_ms / 1000, args.first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
