"""What a `segclip run` costs beyond its stages: reruns of a finished `make demo`.

Every stage is reused, so the time is the command's own: imports, Prefect's temporary
API, the flow, the exit. Each phase ends at a line the command prints: the flow's
"Beginning flow run", the results' "browse the runs", then the process's exit. One
untimed run first (it runs the demo where it has not run).

    python benchmarks/command_overhead.py                     # 3 reruns, workdir/demo
    python benchmarks/command_overhead.py --runs 5 runtime.workdir=/tmp/demo
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from statistics import median

MARKS = ("Beginning flow run", "browse the runs")


def timed_run(overrides: list[str]) -> list[float]:
    """Seconds from the start to each mark, then to the exit."""
    command = [sys.executable, "-m", "flows.cli", "run", "--profile", "demo", *overrides]
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    for line in process.stdout:
        for mark in MARKS:
            if mark in line and mark not in seen:
                seen[mark] = time.monotonic() - start
    if process.wait() != 0 or len(seen) < len(MARKS):
        raise RuntimeError(f"`{shlex.join(command)}` failed or printed no results")
    return [seen[mark] for mark in MARKS] + [time.monotonic() - start]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="reruns timed after one untimed run")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo profile")
    args = parser.parse_args()
    timed_run(args.overrides)
    reruns = [timed_run(args.overrides) for _ in range(args.runs)]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}\n")
    print("| reruns | to the flow's start s | to the results s | to the exit s |")
    print("|---|---|---|---|")
    for name, pick in (("median", median), ("fastest", min), ("slowest", max)):
        cells = " | ".join(f"{pick(run[i] for run in reruns):.1f}" for i in range(len(MARKS) + 1))
        print(f"| {name} of {args.runs} | {cells} |")


if __name__ == "__main__":
    main()
