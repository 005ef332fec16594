"""How long training stalls for a checkpoint save: synchronous vs ``checkpoint.async_save``
(a benchmark; prints figures).

Both runs train the same config side by side on this machine, saving every ``--interval``
iterations. The stall of a save is the time the loop spends in it (the ``save_s`` of each save
record: with async saving, copying the tensors to host memory, forking the writer, and waiting
for the previous save if it is still being written); the run time includes the final wait.

    python bench/checkpoint_bench.py                      # tiny dense, 2 processes
    python bench/checkpoint_bench.py --iters 60 --interval 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import free_port  # noqa: E402


def run(run_dir: Path, iters: int, interval: int, async_save: bool) -> list[dict]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "pretrain", "--config", str(REPO / "configs" / "tiny-dense.yaml"), f"checkpoint.save={run_dir}",
            f"train.train_iters={iters}", f"checkpoint.save_interval={interval}", "scheduler.style=constant",
            "scheduler.warmup_iters=0", "merge.enabled=false", f"checkpoint.async_save={str(async_save).lower()}"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"run failed (async_save={async_save}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="checkpoint_bench_") as tmp:
        print(f"tiny dense, 2 processes (gloo), {args.iters} iterations, a save every {args.interval}")
        print(f"  {'saving':<14}{'stall per save (ms, median)':>29}{'max (ms)':>10}{'iteration (ms)':>16}{'run (s)':>9}")
        for async_save in (False, True):
            records = run(Path(tmp) / f"async-{async_save}", args.iters, args.interval, async_save)
            saves = [r["save_s"] for r in records if r.get("event") == "save"]
            steps = [r["iteration_time_s"] for r in records if "loss" in r][2:]
            end = next(r for r in records if r.get("event") == "end")
            print(f"  {'async' if async_save else 'synchronous':<14}{statistics.median(saves) * 1000:>29.1f}"
                  f"{max(saves) * 1000:>10.1f}{statistics.median(steps) * 1000:>16.1f}{end['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
