"""Wall time and peak memory of a command and every process it starts (Linux /proc), e.g. the quickstart:

    /usr/bin/time -v python benchmarks/tree_memory.py --json runs/quickstart_cost.json -- make quickstart

Once a second it sums, over the command's process tree (Ray's raylet, GCS and workers included), the
proportional set size (PSS: shared pages split between the processes sharing them, so the sum is what the
tree really holds) and the resident set size (RSS: shared pages counted once per process, an over-count).
``/usr/bin/time -v``'s "Maximum resident set size" is the largest single process instead. Also records the
1-minute load average (a busy machine stretches the wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _parents() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def tree(root: int) -> set[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _kb(pid: int, name: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command after --")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_pss = peak_rss = procs = 0
    loads = []
    while proc.poll() is None:
        pids = tree(proc.pid)
        pss = sum(_kb(x, "smaps_rollup", "Pss:") for x in pids)
        if pss > peak_pss:
            peak_pss, procs = pss, len(pids)
        peak_rss = max(peak_rss, sum(_kb(x, "status", "VmRSS:") for x in pids))
        loads.append(os.getloadavg()[0])
        time.sleep(args.interval)
    res = {
        "command": " ".join(cmd),
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_pss_mb": round(peak_pss / 1024),
        "peak_rss_sum_mb": round(peak_rss / 1024),
        "processes_at_peak": procs,
        "load_avg_1min_mean": round(sum(loads) / max(len(loads), 1), 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(res), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
