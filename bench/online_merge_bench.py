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
    python bench/online_merge_bench.py --gpu --json out.json   # one GPU: train_bench's ~1.2B model

With ``--candidates`` it instead measures merge candidates (``merge.candidates``) against the
single merge on the tiny configs: the cost per evaluation (K merged evaluations instead of one),
the snapshot cost and the store's memory:

    python bench/online_merge_bench.py --candidates sma:3,sma:6,sma:10,wma:10,ema:0.2,sma:10/every2

With ``--gpu`` one process trains train_bench's ~1.2B dense GPT (bf16, TE when installed) with
storage host (pinned memory, asynchronous copy) and device, and saves no checkpoint (a merged save
is then not measured). A snapshot's copies are queued on the compute stream, so part of its cost
shows in the next iteration: the overhead counts both.
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
from train_bench import GPU_MODEL  # noqa: E402  (bench/ is this script's own directory)

STORAGE = {"off": [], **{s: ["merge.enabled=true", f"merge.storage={s}"] for s in ("host", "disk", "device")}}
CPU_VARIANTS, GPU_VARIANTS = ("off", "host", "disk"), ("off", "host", "device")
GPU_CONFIG = "tiny-dense"  # with GPU_MODEL's overrides


def run(config: str, overrides: list[str], run_dir: Path, nproc: int = 2) -> list[dict]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "pretrain", "--config", str(REPO / "configs" / f"{config}.yaml"),
            f"checkpoint.save={run_dir}", f"logging.metrics_file={run_dir / 'metrics.jsonl'}", *overrides]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({config} {' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def common_overrides(iters: int, probe: int, gpu: bool) -> list[str]:
    """Overrides shared by every variant of one config."""
    common = [f"train.train_iters={iters}", f"train.eval_interval={iters}", "scheduler.warmup_iters=2",
              "scheduler.wsd_decay_iters=4", f"merge.interval={probe}", "merge.window=5", "merge.start_iteration=0"]
    if gpu:  # GPU_MODEL saves nothing (merge.save needs saves); evaluate once, briefly
        return GPU_MODEL + ["train.global_batch_size=4", "train.eval_iters=2", "merge.save=false"] + common
    return common + [f"checkpoint.save_interval={probe}"]


def _median(values, default=0.0):
    values = list(values)
    return statistics.median(values) if values else default


def bench(config: str, iters: int, probe: int, tmp: Path, gpu: bool = False) -> dict:
    common = common_overrides(iters, probe, gpu)
    variants = GPU_VARIANTS if gpu else CPU_VARIANTS
    nproc = 1 if gpu else 2
    results = {name: run(config, common + STORAGE[name], tmp / f"{config}-{name}", nproc) for name in variants}
    steps = {n: [r for r in rs if "loss" in r][3:] for n, rs in results.items()}  # skip warm-up iterations
    base = statistics.median(r["iteration_time_s"] for r in steps["off"])
    where = "1 GPU (~1.2B dense, bf16)" if gpu else "2 processes (gloo)"
    print(f"\n{config}: {iters} iterations, snapshot every {probe}, window 5, {where}")
    print(f"  merging off: {base * 1000:.1f} ms/iteration (median)")
    print(f"  {'storage':<8}{'snapshot (ms)':>15}{'next step +ms':>15}{'overhead V=10':>15}{'V=100':>9}{'V=1000':>9}"
          f"{'merged eval (s)':>17}{'merged save (s)':>17}{'peak RSS MiB':>14}{'merge state MiB':>17}")
    off_end = next(r for r in results["off"] if r.get("event") == "end")
    figures = {"config": config, "iteration_s": base, "storage": {}}
    for name in variants[1:]:
        rs = results[name]
        # Plain iterations: neither a snapshot nor the one after it (unless that leaves none).
        after_snapshot = {r["iteration"] + 1 for r in steps[name] if "merge_snapshot_s" in r}
        no_snapshot = [r for r in steps[name] if "merge_snapshot_s" not in r]
        plain = [r["iteration_time_s"] for r in no_snapshot if r["iteration"] not in after_snapshot] \
            or [r["iteration_time_s"] for r in no_snapshot]
        # Steady state: the first `window` snapshots also allocate their buffers.
        snaps = [r for r in steps[name] if "merge_snapshot_s" in r]
        snaps = snaps[5:] if len(snaps) > 5 else snaps
        step = statistics.median(plain)
        cost = _median(r["merge_snapshot_s"] for r in snaps)
        following = {r["iteration"]: r["iteration_time_s"] for r in steps[name]}
        next_extra = max(0.0, _median(following[r["iteration"] + 1] for r in snaps if r["iteration"] + 1 in following)
                         - step) if snaps else 0.0
        evals = [r for r in rs if "val_loss_merged" in r]
        end = next(r for r in rs if r.get("event") == "end")
        eval_cost = _median(r["eval_merged_s"] for r in evals)
        merged_save = _median((r["merged_save_s"] for r in rs if "merged_save_s" in r), float("nan"))
        over = [(cost + next_extra) / (v * step) for v in (10, 100, 1000)]
        print(f"  {name:<8}{cost * 1000:>15.2f}{next_extra * 1000:>15.2f}{over[0]:>14.2%}{over[1]:>9.3%}{over[2]:>9.4%}"
              f"{eval_cost:>17.2f}{merged_save:>17.2f}{end['peak_rss_mib']:>14.0f}{end.get('merge_state_mib', 0):>17.2f}")
        assert evals, "no merged evaluation was logged"
        figures["storage"][name] = {"snapshot_s": cost, "next_step_extra_s": next_extra, "step_s": step,
                                    "overhead_v10": over[0], "overhead_v100": over[1], "overhead_v1000": over[2],
                                    "merged_eval_s": eval_cost, "merge_state_mib": end.get("merge_state_mib", 0)}
    plain_eval = _median(r["eval_s"] for r in results["off"] if "eval_s" in r)
    print(f"  merging off: peak RSS {off_end['peak_rss_mib']:.0f} MiB, evaluation {plain_eval:.2f} s")
    return figures


def bench_candidates(config: str, iters: int, candidates: list[str], tmp: Path) -> dict:
    """The single merge vs the same run with K candidates: evaluation cost, snapshot cost, store memory."""
    common = [f"train.train_iters={iters}", f"train.eval_interval={max(1, iters // 4)}", "scheduler.warmup_iters=2",
              "scheduler.wsd_decay_iters=4", "merge.enabled=true", "merge.interval=2", "merge.window=5",
              "merge.start_iteration=0", "merge.save=false"]
    variants = {"single merge": [], f"{len(candidates)} candidates": [f"merge.candidates=[{','.join(candidates)}]"]}
    print(f"\n{config}: {iters} iterations, snapshot every 2, primary sma over 5, 2 processes (gloo); "
          f"candidates {', '.join(candidates)}")
    print(f"  {'variant':<14}{'raw eval (s)':>13}{'merged evals (s)':>18}{'per candidate (s)':>19}"
          f"{'snapshot (ms)':>15}{'store MiB':>11}{'peak RSS MiB':>14}")
    figures = {"config": config, "candidates": candidates}
    for name, extra in variants.items():
        rs = run(config, common + extra, tmp / f"{config}-{name.replace(' ', '-')}")
        evals = [r for r in rs if "val_loss_merged" in r]
        end = next(r for r in rs if r.get("event") == "end")
        raw_eval = _median(r["eval_s"] for r in evals)
        merged = _median(r["eval_merged_s"] + r.get("eval_candidates_s", 0.0) for r in evals)
        count = _median(1 + len(r.get("val_loss_candidates", {})) for r in evals)
        snapshot = _median(r["merge_snapshot_s"] for r in rs if "merge_snapshot_s" in r)
        print(f"  {name:<14}{raw_eval:>13.2f}{merged:>18.2f}{merged / count:>19.3f}{snapshot * 1000:>15.2f}"
              f"{end['merge_state_mib']:>11.2f}{end['peak_rss_mib']:>14.0f}")
        figures[name] = {"raw_eval_s": raw_eval, "merged_evals_s": merged, "merges_per_eval": count,
                         "snapshot_s": snapshot, "store_mib": end["merge_state_mib"], "peak_rss_mib": end["peak_rss_mib"]}
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--probe-interval", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=None, help="default: tiny-dense tiny-moe (CPU)")
    parser.add_argument("--gpu", action="store_true",
                        help="one GPU, train_bench's ~1.2B model, storage host and device")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--candidates", help="comma-separated merge.candidates: compare against the single merge")
    args = parser.parse_args()
    if args.candidates:
        with tempfile.TemporaryDirectory() as tmp:
            figures = [bench_candidates(config, args.iters, args.candidates.split(","), Path(tmp))
                       for config in args.configs or ["tiny-dense"]]
        if args.json is not None:
            args.json.write_text(json.dumps(figures))
        raise SystemExit(0)
    configs = args.configs or ([GPU_CONFIG] if args.gpu else ["tiny-dense", "tiny-moe"])
    with tempfile.TemporaryDirectory() as tmp:
        figures = [bench(config, args.iters, args.probe_interval, Path(tmp), args.gpu) for config in configs]
    if args.json is not None:
        args.json.write_text(json.dumps(figures))
