#!/usr/bin/env python
"""Reproduce the PMA paper's findings at small scale: merged vs raw vs annealed, ablations, PMA-init.

    python experiments/pma_reproduction.py            # full: ~45 min on 2 CPU cores -> docs/results.md
    python experiments/pma_reproduction.py --quick    # a few minutes -> runs/pma-repro-quick/results/

For each config (configs/tiny-dense.yaml, configs/tiny-moe.yaml; 2 processes, the embedded corpus):

1. trunk     one long run: warmup, then a constant LR (the stable phase of WSD), a checkpoint
             every ``save_every`` iterations (V_min), so every interval V = k * V_min is a subset.
2. merges    in-process offline merges (megatron_merge.offline.merge_checkpoints) of the trunk's
             checkpoints: SMA / EMA(0.1) / EMA(0.2) / WMA of the last N at each comparison point,
             and the ablations (N x V with SMA; methods x N at an early and a late point).
3. evaluate  one ``torchrun -m pretrain.evaluate`` over the raw checkpoints at the points and
             every merge: the same fixed validation batches as the trunk's own evaluations.
4. anneal    a fork per point: ``checkpoint.init_from=<trunk>/iter_P`` keeping the iteration,
             data position and Adam state, then a linear decay to optimizer.min_lr over
             D = decay_share * P iterations (WSD: ``scheduler.wsd_decay_iters=D``,
             ``decay_iters = train_iters = P + D``).
5. pma-init  the same decay, started from the SMA merge at P (merged offline with the newest
             input's optimizer state) instead of the raw checkpoint at P.

Then results.json, PNG plots and a results page (tables, the commands, the machine, and an
automatic check of each of the paper's claims). Every stage that already finished in the work
directory is reused, so an interrupted run continues where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {"dense": REPO / "configs" / "tiny-dense.yaml", "moe": REPO / "configs" / "tiny-moe.yaml"}
METHODS = (("sma", None), ("ema", 0.1), ("ema", 0.2), ("wma", None))  # the paper's four


@dataclass(frozen=True)
class Scale:
    """How long and how wide the experiment is (iterations; one iteration = 16 x 128 = 2048 tokens)."""

    name: str
    trunk_iters: int
    warmup_iters: int
    save_every: int  # V_min: every merge interval is a multiple of it
    trunk_eval_every: int
    points: tuple[int, ...]  # merged vs raw vs annealed here
    main_n: int
    main_v: int
    ablation_points: tuple[int, ...]  # N x V (SMA)
    ablation_n: tuple[int, ...]
    ablation_v: tuple[int, ...]
    method_points: tuple[int, ...]  # methods x N (V = main_v)
    method_n: tuple[int, ...]
    decay_share: float  # annealing length D = decay_share * fork iteration
    pma_points: tuple[int, ...]
    eval_iters: int  # validation batches of 16 sequences


FULL = Scale("full", trunk_iters=1200, warmup_iters=20, save_every=10, trunk_eval_every=20,
             points=(200, 400, 600, 800, 1000, 1200), main_n=10, main_v=20,
             ablation_points=(200, 600, 1200), ablation_n=(3, 6, 10, 15), ablation_v=(10, 20, 40),
             method_points=(200, 1200), method_n=(3, 6, 10, 15), decay_share=0.2, pma_points=(400, 800, 1200),
             eval_iters=8)
QUICK = Scale("quick", trunk_iters=120, warmup_iters=20, save_every=10, trunk_eval_every=20,
              points=(60, 120), main_n=4, main_v=10,
              ablation_points=(120,), ablation_n=(3, 6), ablation_v=(10, 20),
              method_points=(60, 120), method_n=(4,), decay_share=0.2, pma_points=(120,), eval_iters=4)


@dataclass(frozen=True)
class MergeSpec:
    """One merge of the trunk's checkpoints: ``n`` of them, ``v`` iterations apart, the newest at ``point``."""

    method: str
    alpha: Optional[float]
    n: int
    v: int
    point: int

    @property
    def label(self) -> str:
        return {"sma": "SMA", "wma": "WMA"}.get(self.method) or f"EMA {self.alpha}"

    @property
    def name(self) -> str:
        method = self.method if self.alpha is None else f"{self.method}{self.alpha}"
        return f"{method}_n{self.n}_v{self.v}_p{self.point}"

    @property
    def iterations(self) -> list[int]:
        return [self.point - (self.n - 1 - i) * self.v for i in range(self.n)]

    def feasible(self, scale: Scale) -> bool:
        """All inputs lie in the constant-LR phase (at or after the end of warmup)."""
        return self.iterations[0] >= scale.warmup_iters and self.v % scale.save_every == 0


def merge_specs(scale: Scale) -> list[MergeSpec]:
    """Every merge the experiment evaluates (deduplicated, in a stable order)."""
    specs = []
    for p in scale.points:
        specs += [MergeSpec(m, a, scale.main_n, scale.main_v, p) for m, a in METHODS]
    for p in scale.ablation_points:
        specs += [MergeSpec("sma", None, n, v, p) for n in scale.ablation_n for v in scale.ablation_v]
    for p in scale.method_points:
        specs += [MergeSpec(m, a, n, scale.main_v, p) for n in scale.method_n for m, a in METHODS]
    # SMA at the iteration where each annealing run ends: merged and annealed at equal tokens.
    specs += [MergeSpec("sma", None, scale.main_n, scale.main_v, p) for p in equal_token_points(scale)]
    seen, unique = set(), []
    for spec in specs:
        if spec not in seen and spec.feasible(scale):
            seen.add(spec)
            unique.append(spec)
    return unique


def anneal_iters(scale: Scale, point: int) -> int:
    """D: the decay length, decay_share of the fork iteration, in whole checkpoint intervals."""
    return scale.save_every * max(1, round(scale.decay_share * point / scale.save_every))


def raw_points(scale: Scale) -> list[int]:
    """The trunk checkpoints evaluated directly: comparison points, ablation points, annealing ends."""
    return sorted({*scale.points, *scale.ablation_points, *scale.method_points, *equal_token_points(scale)})


def equal_token_points(scale: Scale) -> list[int]:
    """Where the annealing runs end, when the trunk reaches that far."""
    return [p + anneal_iters(scale, p) for p in scale.points if p + anneal_iters(scale, p) <= scale.trunk_iters]


# ---------------------------------------------------------------------------------------------
# Running things


class Runner:
    """Launches torchrun jobs, logs their commands and output, keeps stage timings."""

    def __init__(self, nproc: int, log: logging.Logger):
        self.nproc = nproc
        self.log = log
        self.commands: list[str] = []
        self.started = time.perf_counter()
        self.load_samples: list[float] = []  # 1-minute load average after each launch: how shared the cores were

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.started)
        return f"{s // 60:02d}:{s % 60:02d}"

    def torchrun(self, module_args: list[str], log_file: Path, echo=lambda line: False) -> float:
        """``torchrun --nproc-per-node N <module_args>``; output to ``log_file``, selected lines echoed."""
        from pretrain.platform import free_port

        shown = ["torchrun", "--nproc-per-node", str(self.nproc), *module_args]
        command = " ".join(shlex.quote(_rel(a)) for a in shown)
        self.commands.append(command)
        self.log.info("[%s] $ %s", self.elapsed(), command)
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc),
                "--master-port", str(free_port()), *module_args]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        log_file.parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        with log_file.open("w") as sink:
            sink.write(f"$ {command}\n")
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            for line in proc.stdout:
                sink.write(line)
                if echo(line):
                    self.log.info("[%s]     %s", self.elapsed(), line.rstrip())
            proc.wait()
        seconds = time.perf_counter() - began
        self.load_samples.append(os.getloadavg()[0])
        if proc.returncode != 0:
            tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
            raise SystemExit(f"command failed ({proc.returncode}), log {log_file}:\n{tail}")
        return seconds


def _rel(arg: str) -> str:
    """Paths inside the repository shown relative to it (the commands run from the repo root)."""
    text = str(arg)
    prefix = str(REPO) + os.sep
    return text.replace(prefix, "")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(path: Path, iteration: int) -> bool:
    return any(r.get("event") == "end" and r.get("iteration") == iteration for r in read_metrics(path))


def _evaluation_progress(line: str) -> bool:
    """Echo pretrain.evaluate's first, every 10th and last ``[i/n] ...`` line, and errors."""
    if line.startswith("error"):
        return True
    head = line.split(" ", 1)[0]
    if not (head.startswith("[") and head.endswith("]") and "/" in head):
        return False
    i, n = head.strip("[]").split("/")
    return i == "1" or i == n or int(i) % 10 == 0


# ---------------------------------------------------------------------------------------------
# The stages


def common_overrides(scale: Scale) -> list[str]:
    return [f"train.eval_iters={scale.eval_iters}", f"scheduler.warmup_iters={scale.warmup_iters}",
            "merge.enabled=false", "recovery.enabled=false"]


def run_trunk(runner: Runner, config: Path, scale: Scale, trunk: Path) -> dict:
    metrics = trunk / "metrics.jsonl"
    if finished(metrics, scale.trunk_iters):
        runner.log.info("[%s] trunk %s: done already", runner.elapsed(), _rel(str(trunk)))
        return {"seconds": None, "reused": True}
    overrides = [*common_overrides(scale), f"train.train_iters={scale.trunk_iters}", "scheduler.style=constant",
                 f"checkpoint.save={trunk}", f"checkpoint.save_interval={scale.save_every}",
                 f"train.eval_interval={scale.trunk_eval_every}", "logging.log_interval=50"]
    if (trunk / "latest_checkpointed_iteration.txt").is_file():  # an interrupted trunk: resume it
        overrides.append(f"checkpoint.load={trunk}")
    seconds = runner.torchrun(["-m", "pretrain", "--config", str(config), *overrides], trunk / "train.log",
                              echo=lambda l: l.startswith("error") or (l.startswith("iter ") and " | loss " in l))
    return {"seconds": seconds, "reused": False}


def run_merges(runner: Runner, specs: list[MergeSpec], trunk: Path, merged: Path, with_optimizer: set) -> dict:
    from megatron_merge.offline import merge_checkpoints

    began, done = time.perf_counter(), 0
    merged.mkdir(parents=True, exist_ok=True)
    record = (merged / "merges.log").open("w")  # each merge as the equivalent megatron-merge command
    for index, spec in enumerate(specs, start=1):
        out = merged / spec.name
        inputs = [trunk / f"iter_{it:07d}" for it in spec.iterations]
        model_only = spec not in with_optimizer
        cli = ["megatron-merge", "--no-progress", "--method", spec.method,
               *(["--alpha", str(spec.alpha)] if spec.alpha is not None else []),
               *(["--model-only"] if model_only else []), "--out", str(out), *map(str, inputs)]
        record.write(" ".join(shlex.quote(_rel(a)) for a in cli) + "\n")
        if out.is_dir():  # merges appear atomically: a directory is a finished merge
            continue
        result = merge_checkpoints(inputs, out, spec.method, alpha=spec.alpha, model_only=model_only)
        done += 1
        if index % 10 == 0 or index == len(specs):
            runner.log.info("[%s] merged %d/%d (%s: weights %s, %.2f s)", runner.elapsed(), index, len(specs),
                            spec.name, ", ".join(f"{w:.3f}" for w in result.plan.weights), result.seconds)
    record.close()
    return {"seconds": time.perf_counter() - began, "merges": done}


def run_evaluation(runner: Runner, config: Path, scale: Scale, checkpoints: list[Path], out: Path) -> dict:
    """Evaluate the checkpoints not yet in ``out`` (a JSON-lines file) with one pretrain.evaluate launch."""
    known = {r["checkpoint"]: r for r in read_metrics(out)}
    todo = [c for c in checkpoints if str(c) not in known]
    seconds = None
    if todo:
        part = out.with_suffix(".part.jsonl")
        seconds = runner.torchrun(["-m", "pretrain.evaluate", "--config", str(config),
                                   f"train.eval_iters={scale.eval_iters}", f"train.train_iters={scale.trunk_iters}",
                                   "--checkpoints", *map(str, todo), "--out", str(part)],
                                  out.with_suffix(".log"),
                                  echo=_evaluation_progress)
        with out.open("a") as f:
            f.write(part.read_text())
        part.unlink()
    return {"seconds": seconds, "evaluated": len(todo)}


def run_fork(runner: Runner, config: Path, scale: Scale, start: Path, point: int, fork_dir: Path) -> dict:
    """Anneal from ``start`` (a checkpoint at iteration ``point``): linear decay over D iterations."""
    decay = anneal_iters(scale, point)
    end = point + decay
    metrics = fork_dir / "metrics.jsonl"
    if finished(metrics, end):
        return {"seconds": None, "reused": True, "decay_iters": decay}
    shutil.rmtree(fork_dir, ignore_errors=True)
    overrides = [*common_overrides(scale), f"train.train_iters={end}", "scheduler.style=wsd",
                 f"scheduler.decay_iters={end}", f"scheduler.wsd_decay_iters={decay}",
                 "scheduler.wsd_decay_style=linear",
                 f"checkpoint.init_from={start}", "checkpoint.init_keep_iteration=true",
                 "checkpoint.init_optimizer=checkpoint", "checkpoint.save=null", "checkpoint.save_interval=null",
                 f"logging.metrics_file={metrics}", f"train.eval_interval={max(1, decay // 5)}",
                 f"logging.log_interval={max(1, decay // 5)}"]
    seconds = runner.torchrun(["-m", "pretrain", "--config", str(config), *overrides], fork_dir / "train.log",
                              echo=lambda l: l.startswith("error"))
    return {"seconds": seconds, "reused": False, "decay_iters": decay}


# ---------------------------------------------------------------------------------------------
# Collecting


def val_curve(records: list[dict]) -> list[list]:
    """[[iteration, val_loss], ...]; a resumed run's repeated iterations keep the last value."""
    by_iter = {}
    for r in records:
        if "val_loss" in r and r["val_loss"] is not None:
            by_iter[r["iteration"]] = r["val_loss"]
    return [[it, by_iter[it]] for it in sorted(by_iter)]


def fork_record(fork_dir: Path, point: int, decay: int) -> dict:
    records = read_metrics(fork_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r and "iteration_time_s" in r]
    curve = val_curve(records)
    return {
        "from_iteration": point,
        "decay_iters": decay,
        "end_iteration": point + decay,
        "val_loss": curve[-1][1] if curve else None,
        "val_curve": curve,
        "train_loss": [[r["iteration"], r["loss"]] for r in steps],
        "grad_norm": [[r["iteration"], r["grad_norm"]] for r in steps],
        "lr": [[r["iteration"], r["lr"]] for r in steps],
    }


def collect(name: str, config: Path, scale: Scale, work: Path, specs: list[MergeSpec], timings: dict) -> dict:
    trunk = work / "trunk"
    records = read_metrics(trunk / "metrics.jsonl")
    steps = [r for r in records if "loss" in r and "iteration_time_s" in r]
    evals = {r["checkpoint"]: r for r in read_metrics(work / "eval.jsonl")}
    raw = {p: evals[str(trunk / f"iter_{p:07d}")]["val_loss"] for p in raw_points(scale)}
    logged = dict(val_curve(records))
    merges = []
    for spec in specs:
        r = evals[str(work / "merged" / spec.name)]
        merges.append({"name": spec.name, "method": spec.method, "alpha": spec.alpha, "label": spec.label,
                       "n": spec.n, "v": spec.v, "point": spec.point, "iterations": spec.iterations,
                       "val_loss": r["val_loss"], "raw_val_loss": raw.get(spec.point, logged.get(spec.point))})
    anneal = {p: fork_record(work / "anneal" / f"p{p}", p, anneal_iters(scale, p)) for p in scale.points}
    pma = {p: fork_record(work / "pma_init" / f"p{p}", p, anneal_iters(scale, p)) for p in scale.pma_points}
    iteration_times = sorted(r["iteration_time_s"] for r in steps)
    return {
        "config": str(config.relative_to(REPO)),
        "tokens_per_iteration": None,  # filled by main from the config
        "trunk": {
            "iterations": scale.trunk_iters,
            "val_curve": val_curve(records),
            "train_loss": [[r["iteration"], r["loss"]] for r in steps],
            "median_iteration_s": iteration_times[len(iteration_times) // 2] if iteration_times else None,
        },
        "raw": {str(p): raw[p] for p in sorted(raw)},
        "raw_logged_by_training": {str(p): logged.get(p) for p in sorted(raw)},
        "merges": merges,
        "anneal": {str(p): v for p, v in anneal.items()},
        "pma_init": {str(p): v for p, v in pma.items()},
        "timings_s": timings,
    }


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.8g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def write_results(results: dict, path: Path) -> None:
    """results.json: one line per top-level entry and per config section, floats to 8 significant digits."""
    results = _rounded(results)
    lines = []
    for key, value in results.items():
        if key == "configs":
            parts = [f"  {json.dumps(name)}: {{\n" + ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}"
                                                            for k, v in section.items()) + "\n  }"
                     for name, section in value.items()]
            lines.append(' "configs": {\n' + ",\n".join(parts) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def machine_info() -> dict:
    import torch

    from importlib.metadata import version

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": version("megatron-core"), "gpu": torch.cuda.is_available()}


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes: short trunk, two points, few ablations")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["dense", "moe"])
    parser.add_argument("--work", type=Path, help="checkpoints and logs (default runs/pma-repro[-quick])")
    parser.add_argument("--results-dir", type=Path,
                        help="results.json and PNGs (default docs/results, --quick: <work>/results)")
    parser.add_argument("--doc", type=Path, help="the results page (default docs/results.md, --quick: <results-dir>/results.md)")
    parser.add_argument("--fresh", action="store_true", help="delete the work directory first")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (the tiny configs are for 2)")
    parser.add_argument("--report-only", action="store_true", help="re-make plots and the page from results.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL
    work = (args.work or REPO / "runs" / ("pma-repro-quick" if args.quick else "pma-repro")).resolve()
    results_dir = (args.results_dir or (work / "results" if args.quick else REPO / "docs" / "results")).resolve()
    doc = (args.doc or (results_dir / "results.md" if args.quick else REPO / "docs" / "results.md")).resolve()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("pma-repro")
    for noisy in ("megatron_merge", "megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    import pma_plots
    import pma_report

    if args.report_only:
        results = json.loads((results_dir / "results.json").read_text())
        results["findings"] = pma_report.analyse(results)
        write_results(results, results_dir / "results.json")
        pma_plots.make_all(results, results_dir)
        pma_report.write_page(results, results_dir, doc)
        log.info("wrote %s and the plots in %s", _rel(str(doc)), _rel(str(results_dir)))
        return 0

    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PRETRAIN_DATA_CACHE", str(Path.home() / ".cache" / "megatron-pma"))

    runner = Runner(args.nproc, log)
    specs = merge_specs(scale)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    log.info("PMA reproduction (%s): configs %s, work %s", scale.name, ", ".join(args.configs), _rel(str(work)))
    log.info("  trunk %d iterations, checkpoints every %d, points %s, %d merges per config, anneal D = %.0f%% of the "
             "fork iteration, PMA-init at %s", scale.trunk_iters, scale.save_every, list(scale.points), len(specs),
             100 * scale.decay_share, list(scale.pma_points))

    from pretrain.config import load_config

    per_config = {}
    for name in args.configs:
        config, cdir = CONFIGS[name], work / name
        cfg = load_config(config)
        timings = {}
        log.info("[%s] == %s (%s) ==", runner.elapsed(), name, _rel(str(config)))
        t0 = time.perf_counter()
        run_trunk(runner, config, scale, cdir / "trunk")
        timings["trunk"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        pma_sources = {MergeSpec("sma", None, scale.main_n, scale.main_v, p) for p in scale.pma_points}
        run_merges(runner, specs, cdir / "trunk", cdir / "merged", with_optimizer=pma_sources)
        timings["merges"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        checkpoints = [cdir / "trunk" / f"iter_{p:07d}" for p in raw_points(scale)] + [cdir / "merged" / s.name
                                                                                      for s in specs]
        log.info("[%s] evaluating %d checkpoints", runner.elapsed(), len(checkpoints))
        run_evaluation(runner, config, scale, checkpoints, cdir / "eval.jsonl")
        timings["evaluate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for p in scale.points:
            r = run_fork(runner, config, scale, cdir / "trunk" / f"iter_{p:07d}", p, cdir / "anneal" / f"p{p}")
            end = read_metrics(cdir / "anneal" / f"p{p}" / "metrics.jsonl")
            last = val_curve(end)[-1]
            log.info("[%s] annealed from %d over %d iterations: val loss %.4f", runner.elapsed(), p, r["decay_iters"],
                     last[1])
        timings["anneal"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for p in scale.pma_points:
            source = cdir / "merged" / MergeSpec("sma", None, scale.main_n, scale.main_v, p).name
            r = run_fork(runner, config, scale, source, p, cdir / "pma_init" / f"p{p}")
            last = val_curve(read_metrics(cdir / "pma_init" / f"p{p}" / "metrics.jsonl"))[-1]
            log.info("[%s] annealed from the SMA merge at %d: val loss %.4f", runner.elapsed(), p, last[1])
        timings["pma_init"] = time.perf_counter() - t0

        result = collect(name, config, scale, cdir, specs, timings)
        result["tokens_per_iteration"] = cfg.train.global_batch_size * cfg.train.seq_length
        result["lr"], result["min_lr"] = cfg.optimizer.lr, cfg.optimizer.min_lr
        per_config[name] = result

    results = {
        "scale": dataclasses.asdict(scale),
        "command": " ".join(["python", "experiments/pma_reproduction.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": started_at,
        "wall_time_s": time.perf_counter() - runner.started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "load_average_samples": runner.load_samples,
        "machine": machine_info(),
        "commands": runner.commands,
        "configs": per_config,
    }
    results["findings"] = pma_report.analyse(results)
    write_results(results, results_dir / "results.json")
    pma_plots.make_all(results, results_dir)
    pma_report.write_page(results, results_dir, doc)
    log.info("[%s] done: %s, %s, plots in %s", runner.elapsed(), _rel(str(results_dir / "results.json")),
             _rel(str(doc)), _rel(str(results_dir)))
    if scale.name == "quick":
        log.info("  quick scale: a short run, too early in training for most of the paper's claims; the verdicts "
                 "below check the pipeline, not the paper (run without --quick for those)")
    for finding in results["findings"]:
        log.info("  %-13s [%s] %s: %s", finding["verdict"], finding["config"], finding["claim"], finding["measured"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
