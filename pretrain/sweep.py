"""Which merge? A grid of merges of a run's saved checkpoints, evaluated in memory.

    torchrun --nproc-per-node N -m pretrain.evaluate --sweep RUN_DIR [--last 2,3,5] [--every 1,2] \\
        [--methods sma,wma,ema] [--alphas 0.2] [--end ITER ...] [--out sweep.jsonl] [--plot PNG] \\
        [section.key=value ...]

For every method x N (``--last``) x K (``--every``: every K-th saved checkpoint, counting back
from the newest, as ``megatron-merge --last N --every K``), each rank merges its own partition of the
chosen checkpoints into the model in memory (:func:`pretrain.merging.install_merged_checkpoints`,
the offline tool's arithmetic: nothing is written to disk) and evaluates it on the run's fixed
validation batches, like ``pretrain.evaluate``; so a candidate's number equals
``pretrain.evaluate`` of ``megatron-merge``'s output at the same layout. EMA candidates are
``ema<ALPHA>:N[/everyK]``: the EMA over those N checkpoints. ``--end`` evaluates the grid ending
at earlier saved iterations too (the picture's x axis). Output: one JSON line per candidate (and
one ``raw`` line per end iteration) on stdout and in ``--out``, a table, the PNG (matplotlib
when installed; default ``<RUN_DIR>/merge_sweep.png``) and the best candidate's
``megatron-merge`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

WINDOW_METHODS = ("sma", "wma", "wsm-linear", "wsm-minus-sqrt", "ema")


@dataclass(frozen=True)
class SweepPoint:
    """One merge of the grid: ``method`` over ``n`` saved checkpoints ``every`` apart."""

    method: str
    n: int
    every: int
    alpha: Optional[float] = None

    @property
    def name(self) -> str:
        head = f"ema{self.alpha:g}" if self.method == "ema" else self.method
        return f"{head}:{self.n}" + ("" if self.every == 1 else f"/every{self.every}")

    def pick(self, saved: Sequence[int], end: int) -> Optional[list[int]]:
        """The saved iterations this merge takes when ending at ``end`` (oldest first), or None."""
        newest_first = sorted((i for i in saved if i <= end), reverse=True)[::self.every][:self.n]
        return sorted(newest_first) if len(newest_first) == self.n else None

    def megatron_merge_command(self, run_dir: Path, iterations: Sequence[int]) -> str:
        args = ["megatron-merge", "--method", self.method]
        if self.method == "ema":
            args += ["--alpha", f"{self.alpha:g}"]
        slug = self.name.replace(":", "_").replace("/", "_")
        args += ["--iterations", ",".join(map(str, iterations)),
                 "--out", str(run_dir.parent / f"{run_dir.name}-{slug}-iter{iterations[-1]}"), str(run_dir)]
        return shlex.join(args)


def grid(methods: Sequence[str], ns: Sequence[int], everies: Sequence[int], alphas: Sequence[float]) -> list[SweepPoint]:
    """Every method x N x every (x alpha for ema)."""
    points = []
    for method in methods:
        for alpha in (alphas if method == "ema" else [None]):
            points += [SweepPoint(method, n, every, alpha) for n in ns for every in everies]
    return points


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _alpha_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 < a <= 1.0 for a in values):
        raise argparse.ArgumentTypeError(f"EMA alphas must be in (0, 1], got {text!r}")
    return values


def _method_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in WINDOW_METHODS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"methods must be among {', '.join(WINDOW_METHODS)}, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain-evaluate --sweep",
        description="Evaluate a grid of merges of a run's saved checkpoints, merged per rank in memory.",
        epilog="Overrides (section.key=value) go after the options.",
    )
    parser.add_argument("--sweep", required=True, metavar="RUN_DIR", help="run directory (its iter_* checkpoints)")
    parser.add_argument("--config", "-c", help="YAML run config (default: run_config.yaml of the newest checkpoint)")
    parser.add_argument("--methods", type=_method_list, default=["sma", "wma", "ema"], help="default sma,wma,ema")
    parser.add_argument("--last", type=_int_list, default=[2, 3, 4],
                        help="N: checkpoints per merge, the newest N (default 2,3,4)")
    parser.add_argument("--every", type=_int_list, default=[1, 2],
                        help="every K-th saved checkpoint (default 1,2)")
    parser.add_argument("--alphas", type=_alpha_list, default=[0.2], help="EMA factors (default 0.2)")
    parser.add_argument("--end", type=int, nargs="+", metavar="ITER",
                        help="saved iterations the merges end at (default: the newest)")
    parser.add_argument("--out", help="write the JSON lines to this file")
    parser.add_argument("--plot", help="PNG of validation loss vs tokens (default <RUN_DIR>/merge_sweep.png)")
    parser.add_argument("--log-level", default=os.environ.get("PRETRAIN_LOG_LEVEL", "WARNING"))
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    args.last = [n for n in args.last if n >= 2] or parser.error("--last: merging needs at least 2 checkpoints")
    return args


def run_sweep(cfg, run_dir: Path, points: Sequence[SweepPoint], ends: Sequence[int], saved: dict[int, Path],
              emit) -> list[dict]:
    """Evaluate the raw checkpoint at each end and every grid point that fits; ``emit`` gets each record."""
    from pretrain import checkpoint as ckpt
    from pretrain import train
    from pretrain.evaluate import NoOptimizer, evaluation_model
    from megatron_merge.weights import DEFAULT_EMA_ALPHA
    from pretrain.config import MergeSelection
    from pretrain.merging import install_merged_checkpoints

    model, valid_batches = evaluation_model(cfg)
    records = []
    for end in ends:
        began = time.perf_counter()
        ckpt.load_checkpoint(cfg, model, NoOptimizer(), None, saved[end], load_optimizer=False, load_rng=False)
        raw = train.evaluate(model, valid_batches, cfg)
        records.append(emit({"candidate": "raw", "end_iteration": end, "iterations": [end], "val_loss": raw,
                             "seconds": round(time.perf_counter() - began, 3)}))
        for point in points:
            iterations = point.pick(saved, end)
            if iterations is None:
                continue
            began = time.perf_counter()
            selection = MergeSelection(method=point.method, window=len(iterations),
                                       ema_alpha=point.alpha if point.alpha is not None else DEFAULT_EMA_ALPHA)
            weights = install_merged_checkpoints(model, None, [saved[i] for i in iterations], selection)
            loss = train.evaluate(model, valid_batches, cfg)
            records.append(emit({
                "candidate": point.name, "method": point.method, "n": point.n, "every": point.every,
                "alpha": point.alpha, "end_iteration": end, "iterations": iterations, "weights": weights,
                "val_loss": loss, "margin": None if loss is None else raw - loss,
                "seconds": round(time.perf_counter() - began, 3),
                "megatron_merge": point.megatron_merge_command(run_dir, iterations)}))
    return records


def as_evaluations(records: Sequence[dict]) -> list[dict]:
    """Sweep records as evaluation records (one per end iteration) for the table and the picture."""
    by_end: dict[int, dict] = {}
    for r in records:
        e = by_end.setdefault(r["end_iteration"], {"iteration": r["end_iteration"], "val_loss_candidates": {}})
        if r["candidate"] == "raw":
            e["val_loss"] = r["val_loss"]
        else:
            e["val_loss_candidates"][r["candidate"]] = r["val_loss"]
    return [by_end[k] for k in sorted(by_end)]


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_merge.errors import MergeError
    from megatron_merge.selection import saved_iterations
    from pretrain.__main__ import _configure_logging
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError, validate
    from pretrain.evaluate import evaluation_config

    _configure_logging(args.log_level)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    run_dir = Path(args.sweep)
    try:
        saved = saved_iterations(run_dir)
        if not saved:
            raise MergeError(f"{run_dir}: no iter_* checkpoint directories in this run directory")
        ends = sorted(args.end or [max(saved)])
        missing = [e for e in ends if e not in saved]
        if missing:
            raise MergeError(f"--end: iterations {missing} were not saved in {run_dir}; saved: {sorted(saved)}")
        cfg = evaluation_config(args.config, args.overrides, saved[ends[-1]])
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except (ConfigError, CheckpointError, MergeError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    points = grid(args.methods, args.last, args.every, args.alphas)

    from pretrain import train
    from pretrain.fatal import report_fatal
    from pretrain.platform import process_group_teardown

    sink = []  # the --out file, opened by the logging rank at its first record

    def emit(record: dict) -> dict:
        if train.is_logging_rank():
            print(json.dumps(record), flush=True)
            if args.out and not sink:
                sink.append(open(args.out, "w"))
            for f in sink:
                f.write(json.dumps(record) + "\n")
        return record

    with process_group_teardown():
        try:
            records = run_sweep(cfg, run_dir, points, ends, saved, emit)
        except (CheckpointError, ConfigError, MergeError, FileNotFoundError) as exc:
            report_fatal(str(exc))  # every rank fails the same merge together: said once
            return 1
        finally:
            for f in sink:
                f.close()
        if train.is_logging_rank():
            report(records, run_dir, Path(args.plot) if args.plot else run_dir / "merge_sweep.png",
                   cfg.train.global_batch_size * cfg.train.seq_length)
    return 0


def report(records: Sequence[dict], run_dir: Path, plot: Path, tokens_per_iteration: int) -> None:
    """The table, the picture and the best candidate's megatron-merge command (logging rank)."""
    from pretrain.candidate_report import candidate_table, noise_level, plot_candidates, records_noise

    merged = sorted((r for r in records if r["candidate"] != "raw"), key=lambda r: (r["end_iteration"], r["val_loss"]))
    raw = {r["end_iteration"]: r["val_loss"] for r in records if r["candidate"] == "raw"}
    lines = ["", f"merge sweep of {run_dir}: {len(merged)} candidates",
             f"  {'candidate':<18} {'end':>7}  {'iterations':<28} {'val_loss':>9}  raw - merged"]
    for r in merged:
        lines.append(f"  {r['candidate']:<18} {r['end_iteration']:7d}  {','.join(map(str, r['iterations'])):<28} "
                     f"{r['val_loss']:9.4f}  {r['margin']:+.4f}")
    evaluations = as_evaluations(records)
    # The jitter between the swept checkpoints, or (fewer than 3) between the run's logged evaluations.
    noise = records_noise(evaluations)
    noise = noise if noise is not None else noise_level(_raw_history(run_dir))
    lines += candidate_table(evaluations, noise=noise)
    if merged:
        newest = max(raw)
        best = min((r for r in merged if r["end_iteration"] == newest), key=lambda r: r["val_loss"], default=None)
        if best is not None:
            lines.append(f"best at iteration {newest}: {best['candidate']} {best['val_loss']:.4f} "
                         f"(raw {raw[newest]:.4f}, {best['margin']:+.4f}); write it out with:")
            lines.append(f"  {best['megatron_merge']}")
    written = plot_candidates(_with_history(evaluations, run_dir), plot, tokens_per_iteration,
                              title=f"merge sweep of {run_dir.name}", noise=noise)
    if written is not None:
        lines.append(f"picture: {written}")
    print("\n".join(lines), flush=True)


def _raw_history(run_dir: Path) -> list[float]:
    """The raw val_loss the training run logged at its evaluations (its metrics.jsonl), if any."""
    return [r["val_loss"] for r in _logged_evaluations(run_dir)]


def _logged_evaluations(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    from pretrain.metrics import read_metrics

    return [r for r in read_metrics(path) if isinstance(r.get("val_loss"), float)]


def _with_history(evaluations: list[dict], run_dir: Path) -> list[dict]:
    """The sweep's evaluations plus the run's logged raw losses at other iterations (the raw curve)."""
    ends = {e["iteration"] for e in evaluations}
    logged = [{"iteration": r["iteration"], "val_loss": r["val_loss"]} for r in _logged_evaluations(run_dir)
              if r["iteration"] not in ends]
    return sorted([*evaluations, *logged], key=lambda e: e["iteration"])


if __name__ == "__main__":  # keep the guard: checkpoint loading may start worker processes
    sys.exit(main())
