"""How many packets the outer connection carries per MiB moved, by size (deterministic, unlike timings).

    python -m tests.bench.packets gevent,forward     # variants of tests/bench/bench_mount.py

Builds the benchmark's topology, then for each variant and phase (one fresh
worker each) writes or reads 32 MiB through a fresh sshfs mount, with the
worker counting python-x2go's outer packets by direction and size
(``X2GO_BENCH_PACKETS``, tests/bench/worker.py).  Per-packet work is what a
paramiko hop costs, so this is the count to keep low.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.bench import bench_mount as bm

MOVED = 32 * bm.MiB


def size_label(bucket: str) -> str:
    n = int(bucket)
    return "<1K" if n == 0 else f"<={n // 1024}K"


def main(argv: list[str]) -> int:
    variants = (argv[0] if argv else "gevent,forward").split(",")
    with tempfile.TemporaryDirectory(prefix="x2go-bench-") as tmp:
        counts_dir = Path(tmp) / "counts"
        counts_dir.mkdir()
        os.environ["X2GO_BENCH_PACKETS"] = str(counts_dir)  # inherited by the workers
        bench = bm.Bench(Path(tmp), bm.SHORT, "", None)
        bench.sizes.seq_bytes = MOVED
        try:
            for variant in variants:
                for phase in ("write", "read"):
                    ep = bench.endpoint(variant)
                    try:
                        mnt = bench.mount(ep)
                        if phase == "read":
                            src = bench.local_file(MOVED)
                            os.sync()
                            rate = bench.seq_read(mnt, src)
                        else:
                            rate = bench.seq_write(mnt)
                    finally:
                        bench.unmount_all()
                        ep.stop()  # the worker writes its counts as it exits
                        bench.cleanup_data()
                    files = sorted(counts_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
                    counts = json.loads(files[-1].read_text())
                    for f in files:
                        f.unlink()
                    for direction in ("in", "out"):
                        total = sum(counts[direction].values())
                        sizes = ", ".join(f"{size_label(k)}: {n}" for k, n in
                                          sorted(counts[direction].items(), key=lambda kv: int(kv[0])))
                        print(f"{variant} {phase} ({rate:.0f} MB/s): outer packets {direction} "
                              f"{total / (MOVED / bm.MiB):.1f} per MiB ({sizes})", flush=True)
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
