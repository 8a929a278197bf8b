"""Summarise a py-spy ``--format raw`` profile: where the samples are, by function.

    python -m tests.bench.profile_summary /tmp/prof/gevent-write.txt [--top 25] [--idle]

Prints the functions with the most *own* samples (the frame that was running)
and the most *inclusive* samples (on the stack at all), as percentages of the
non-idle samples.  Idle samples (a thread waiting in a lock, select, the gevent
hub's loop) are dropped unless ``--idle``.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

# Leaf frames that mean "waiting", not "working".
IDLE_MARKERS = ("wait (threading.py", "select (", "run (gevent/hub.py", "_wait (", "acquire (",
                "sleep (", "poll (", "switch (gevent", "get (gevent", "wait (gevent", "wait_on_watcher",
                "acquire_with_timeout (")  # gevent's idle threadpool worker, a real thread blocked in a lock


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--idle", action="store_true", help="keep idle samples")
    args = parser.parse_args()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in load(args.profile):
        leaf = frames[-1]
        if not args.idle and any(m in leaf for m in IDLE_MARKERS):
            continue
        total += count
        own[short(leaf)] += count
        for f in {short(f) for f in frames}:
            incl[f] += count
    print(f"{args.profile.name}: {total} busy samples")
    print(f"{'own %':>6}  function")
    for name, n in own.most_common(args.top):
        print(f"{100 * n / max(total, 1):6.1f}  {name}")
    print(f"{'incl %':>6}  function")
    for name, n in incl.most_common(args.top):
        print(f"{100 * n / max(total, 1):6.1f}  {name}")


if __name__ == "__main__":
    main()
