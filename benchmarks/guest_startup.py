#!/opt/tlshd/bin/python3
"""Start-up benchmark, guest side: time to READY and idle memory of our daemon.

Runs inside the lab guest (tests/lab) as the scenario of one boot, with the
daemon's own Python.  STARTUP_RUNS (default 8) times: start the daemon
(`tlshd -s -c /etc/tlshd/config`, upstream's config format, ECDSA P-256
server certificate, loglevel=1 so that the zygote logs its start-up steps),
time exec -> its "serving handshakes" line (the moment it sends READY), let
it idle 2 s, then read every process's /proc/<pid>/smaps_rollup and
`tlshd status --json`, and stop it.  Our package is byte-compiled first, as
`pip install` does.  The first start of a boot also pays for a cold page
cache; benchmarks/startup.py reports it apart.

Results: /lab/results/startup.json - benchmarks/startup.py reads it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import labguest as lg

RESULTS = Path("/lab/results")
PKI = Path("/etc/tlshd/pki-startup")
READY_LINE = "serving handshakes"
SMAPS_FIELDS = (
    "Rss",
    "Pss",
    "Shared_Clean",
    "Shared_Dirty",
    "Private_Clean",
    "Private_Dirty",
    "AnonHugePages",
)
MAPPING_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
MAPPING_FIELDS = ("Pss", "Private_Dirty", "Private_Clean", "Shared_Dirty")
STEPS = re.compile(r"zygote \d+ ready: (.*)$", re.MULTILINE)
SPAWN_TO_READY = re.compile(
    r"serving handshakes, ([\d.]+) s after exec \(zygote ready in ([\d.]+) s"
)


def smaps_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        if name in SMAPS_FIELDS:
            out[name] = int(value.split()[0])
    return out


def mappings_kib(pid: int, top: int = 8) -> list[dict]:
    """The `top` mappings of `pid` by PSS, pages of one file (or [heap], or
    anonymous) added up: where a process's memory is, by what holds it."""
    by_name: dict[str, dict[str, int]] = {}
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING_HEADER.match(line):
            fields = line.split()
            name = fields[5] if len(fields) > 5 else "[anon]"
            continue
        head, _, value = line.partition(":")
        if head in MAPPING_FIELDS:
            row = by_name.setdefault(name, dict.fromkeys(MAPPING_FIELDS, 0))
            row[head] += int(value.split()[0])
    rows = sorted(by_name.items(), key=lambda item: -item[1]["Pss"])[:top]
    return [{"mapping": name, **row} for name, row in rows]


def process_memory(status: dict) -> list[dict]:
    rows = []
    for proc in status.get("memory", {}).get("processes", []):
        pid = proc["pid"]
        try:
            title = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
            rows.append({"pid": pid, "title": title, **smaps_kib(pid),
                         "mappings": mappings_kib(pid)})  # fmt: skip
        except OSError as err:
            rows.append({"pid": pid, "error": str(err)})
    return rows


def _read_log(path: Path) -> str:
    """The log so far; "" when the guest's shared directory answers a read of a
    file being written with ENODATA (seen on the 7.3 image), so the poll retries."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def one_start(index: int) -> dict:
    log_path = RESULTS / f"daemon-{index}.log"
    with open(log_path, "w") as logf:
        t0 = time.monotonic()
        proc = subprocess.Popen(lg.OURS, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)  # fmt: skip
        while READY_LINE not in _read_log(log_path):
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited rc={proc.returncode}; see {log_path}")
            if time.monotonic() - t0 > 120:
                raise RuntimeError("not ready after 120 s")
            time.sleep(0.02)
        ready_s = time.monotonic() - t0
        time.sleep(2.0)
        status_run = lg.sh(["/opt/tlshd/bin/tlshd", "status", "--json", "-c", str(lg.CONFIG)],
                           check=False, timeout=30)  # fmt: skip
        status = json.loads(status_run.stdout)
        processes = process_memory(status)
        proc.terminate()
        proc.wait(30)
    text = log_path.read_text(errors="replace")
    steps = STEPS.search(text)
    spawn = SPAWN_TO_READY.search(text)
    return {
        "ready_s": round(ready_s, 3),
        # From the daemon's own line: exec -> zygote forked, and fork -> zygote ready.
        "zygote_forked_after_s": (
            round(float(spawn.group(1)) - float(spawn.group(2)), 2) if spawn else None
        ),
        "zygote_start_s": float(spawn.group(2)) if spawn else None,
        "zygote_steps": steps.group(1) if steps else None,
        "total_pss_kib": status.get("memory", {}).get("total_pss_bytes", 0) // 1024,
        "processes": processes,
    }


def main() -> int:
    runs = int(os.environ.get("STARTUP_RUNS", "8"))
    lg.make_pki(PKI)
    pkg = Path(sysconfig.get_paths()["purelib"]) / "tlshd"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    lg.write_config(PKI, loglevel=1)
    lg.sh(["modprobe", "tls"])
    starts = []
    for index in range(runs):
        starts.append(one_start(index))
        lg.log(f"start {index}: ready after {starts[-1]['ready_s']} s, "
               f"PSS {starts[-1]['total_pss_kib']} KiB")  # fmt: skip
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    doc = {"kernel": os.uname().release, "python": sys.version.split()[0], "starts": starts,
           "thp": thp}  # fmt: skip
    (RESULTS / "startup.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
