"""In-training merging overhead: iteration time and memory with merging off vs on (a benchmark).

Prints figures; asserts nothing. For each config (tiny dense, tiny MoE) one invocation runs,
side by side on this machine: merging off, and merging on with each storage option (host,
disk), with a snapshot every ``--probe-interval`` iterations so that many snapshots are
measured. From those runs it reports

* the median iteration time without a snapshot, and the median extra time of a snapshot;
* the overhead amortised over realistic intervals V: snapshot cost / (V x iteration time);
* what a merged evaluation / merged checkpoint costs (they happen at eval and save intervals);
* peak RSS of the logging rank and the merge state it holds.

    python bench/online_merge_bench.py                 # tiny dense and tiny MoE, 2 processes
    python bench/online_merge_bench.py --iters 60 --configs tiny-dense
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

VARIANTS = {
    "off": [],
    "host": ["merge.enabled=true", "merge.storage=host"],
    "disk": ["merge.enabled=true", "merge.storage=disk"],
}


def run(config: str, overrides: list[str], run_dir: Path) -> list[dict]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "pretrain", "--config", str(REPO / "configs" / f"{config}.yaml"), f"checkpoint.save={run_dir}",
            *overrides]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({config} {' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bench(config: str, iters: int, probe: int, tmp: Path) -> None:
    common = [f"train.train_iters={iters}", f"train.eval_interval={iters}", f"checkpoint.save_interval={probe}",
              "scheduler.warmup_iters=2", "scheduler.wsd_decay_iters=4",
              f"merge.interval={probe}", "merge.window=5", "merge.start_iteration=0"]
    results = {name: run(config, common + extra, tmp / f"{config}-{name}") for name, extra in VARIANTS.items()}
    steps = {n: [r for r in rs if "loss" in r][3:] for n, rs in results.items()}  # skip warm-up iterations
    base = statistics.median(r["iteration_time_s"] for r in steps["off"])
    print(f"\n{config}: {iters} iterations, snapshot every {probe}, window 5, 2 processes (gloo)")
    print(f"  merging off: {base * 1000:.1f} ms/iteration (median)")
    print(f"  {'storage':<8}{'snapshot (ms)':>15}{'overhead V=10':>15}{'V=100':>9}{'V=1000':>9}"
          f"{'merged eval (s)':>17}{'merged save (s)':>17}{'peak RSS MiB':>14}{'merge state MiB':>17}")
    off_end = next(r for r in results["off"] if r.get("event") == "end")
    for name in ("host", "disk"):
        rs = results[name]
        plain = [r["iteration_time_s"] for r in steps[name] if "merge_snapshot_s" not in r]
        snap = [r["merge_snapshot_s"] for r in steps[name] if "merge_snapshot_s" in r]
        step = statistics.median(plain)
        cost = statistics.median(snap) if snap else 0.0
        evals = [r for r in rs if "val_loss_merged" in r]
        end = next(r for r in rs if r.get("event") == "end")
        eval_cost = statistics.median(r["eval_merged_s"] for r in evals)
        merged_save = statistics.median(r["merged_save_s"] for r in rs if "merged_save_s" in r)
        over = [cost / (v * step) for v in (10, 100, 1000)]
        print(f"  {name:<8}{cost * 1000:>15.2f}{over[0]:>14.2%}{over[1]:>9.3%}{over[2]:>9.4%}"
              f"{eval_cost:>17.2f}{merged_save:>17.2f}{end['peak_rss_mib']:>14.0f}{end.get('merge_state_mib', 0):>17.2f}")
        assert evals, "no merged evaluation was logged"
    plain_eval = statistics.median(r["eval_s"] for r in results["off"] if "eval_s" in r)
    print(f"  merging off: peak RSS {off_end['peak_rss_mib']:.0f} MiB, evaluation {plain_eval:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--probe-interval", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=["tiny-dense", "tiny-moe"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            bench(config, args.iters, args.probe_interval, Path(tmp))
