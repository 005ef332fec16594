"""Validation loss of saved checkpoints, the model built once.

    torchrun --nproc-per-node N -m pretrain.evaluate [--config X.yaml] [section.key=value ...] \\
        --checkpoints A B C ... [--out results.jsonl]

Each checkpoint (an ``iter_*`` directory, a merged checkpoint, or a run directory = its newest
checkpoint) is loaded into the same model -- weights only; megatron-core reshards to this
launch's layout -- and evaluated with :func:`pretrain.train.evaluate` on the run's fixed
validation batches (``train.eval_iters`` global batches of the validation split), so the loss
equals the ``val_loss`` the training run logged at that iteration. One JSON line per checkpoint,
``{"checkpoint", "iteration", "val_loss", "load_s", "eval_s"}`` (plus ``merge_method`` and
``merged_iterations`` when a ``merge.json`` describes it), on stdout and in ``--out``.

``--sweep RUN_DIR`` evaluates a grid of merges of a run's checkpoints instead, merged per rank in
memory (see :mod:`pretrain.sweep`).

``--config`` defaults to the ``run_config.yaml`` saved in the first checkpoint; overrides come
before ``--checkpoints``. Settings that only matter to training (resuming, PMA-init, in-training
merging, recovery) are switched off. Keep ``train.eval_iters``, ``train.seq_length``,
``train.global_batch_size``, ``train.seed`` and the data settings as in training: they decide
the validation batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from pretrain.config import ConfigError, RunConfig, load_config, validate
from pretrain.fatal import report_fatal

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain-evaluate",
        description="Validation loss of saved checkpoints (the training run's fixed validation batches).",
        epilog="Overrides (section.key=value) go before --checkpoints.",
    )
    parser.add_argument("--config", "-c", help="YAML run config (default: run_config.yaml of the first checkpoint)")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                        help="iter_* directories, merged checkpoints or run directories (their newest checkpoint)")
    parser.add_argument("--out", help="write one JSON line per checkpoint to this file")
    parser.add_argument("--log-level", default=os.environ.get("PRETRAIN_LOG_LEVEL", "WARNING"))
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def evaluation_config(config: Optional[str], overrides: list[str], first_checkpoint: Path) -> RunConfig:
    """The run config to evaluate with: ``config`` or the checkpoint's own, training-only parts off."""
    from pretrain.checkpoint import CONFIG_FILE, resolve_checkpoint

    if config is None:
        directory, _ = resolve_checkpoint(first_checkpoint)
        config = directory / CONFIG_FILE
        if not config.is_file():
            raise ConfigError(f"{config}: no saved run config beside the checkpoint; pass --config")
    cfg = load_config(config, overrides)
    return dataclasses.replace(
        cfg,
        checkpoint=dataclasses.replace(cfg.checkpoint, load=None, init_from=None,
                                       init_merge=dataclasses.replace(cfg.checkpoint.init_merge, enabled=False),
                                       save=None, save_interval=None, keep_last=None, keep_every=None),
        merge=dataclasses.replace(cfg.merge, enabled=False, keep_last=None, keep_every=None),
        recovery=dataclasses.replace(cfg.recovery, enabled=False),
    )


class NoOptimizer:
    """Stands in for the optimizer when only weights are loaded: no fp32 main copy to refresh."""

    def reload_model_params(self) -> None:
        pass


def _merge_description(directory: Path) -> dict:
    """The method and inputs of a merged checkpoint (from its merge.json); {} for a raw one."""
    from megatron_merge.record import input_iterations, read_record

    record = read_record(directory)
    if not record:
        return {}
    return {"merge_method": record.get("method"), "merged_iterations": input_iterations(record)}


def evaluation_model(cfg: RunConfig) -> tuple[list, list]:
    """Process groups, the model (built once, no optimizer) and training's fixed validation batches."""
    from pretrain import train
    from pretrain.batches import build_training_data
    from pretrain.model import build_model
    from pretrain.platform import init_distributed

    platform = init_distributed(cfg)
    train.set_seeds(cfg.train.seed)
    data = build_training_data(cfg, platform)
    valid_batches = data.valid_batches()
    if not valid_batches:
        raise ConfigError(f"data.split: {cfg.data.split!r} has no validation share: nothing to evaluate on")
    return build_model(cfg, platform, data.vocab_size), valid_batches


def evaluate_checkpoints(cfg: RunConfig, checkpoints: list[Path], out: Optional[Path] = None) -> list[dict]:
    """Build the model once, then load and evaluate each checkpoint; returns the records (logging rank)."""
    from pretrain import checkpoint as ckpt
    from pretrain import train

    model, valid_batches = evaluation_model(cfg)
    logging_rank = train.is_logging_rank()
    records = []
    sink = open(out, "w") if (out is not None and logging_rank) else None
    try:
        for index, path in enumerate(checkpoints, start=1):
            began = time.perf_counter()
            directory, _ = ckpt.resolve_checkpoint(path)
            state = ckpt.load_checkpoint(cfg, model, NoOptimizer(), None, directory,
                                         load_optimizer=False, load_rng=False)
            loaded = time.perf_counter()
            val_loss = train.evaluate(model, valid_batches, cfg)
            if not logging_rank:
                continue
            record = {"checkpoint": str(path), "iteration": state.iteration, "val_loss": val_loss,
                      "load_s": round(loaded - began, 3), "eval_s": round(time.perf_counter() - loaded, 3),
                      **_merge_description(directory)}
            records.append(record)
            # The JSON line on stdout (for pipes), the readable one on stderr.
            print(json.dumps(record), flush=True)
            print(f"[{index}/{len(checkpoints)}] iteration {state.iteration:7d} | validation loss {val_loss:.6f} | "
                  f"{path}", file=sys.stderr, flush=True)
            if sink is not None:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    return records


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--sweep" in argv:  # a grid of merges of one run directory: pretrain/sweep.py
        from pretrain.sweep import main as sweep_main

        return sweep_main(argv)
    args = parse_args(argv)
    from pretrain.__main__ import _configure_logging

    _configure_logging(args.log_level)
    checkpoints = [Path(p) for p in args.checkpoints]
    missing = [str(p) for p in checkpoints if not p.exists()]
    if missing:
        hint = " (config overrides go before --checkpoints)" if any("=" in m for m in missing) else ""
        report_fatal(f"no such checkpoint: {', '.join(missing)}{hint}")
        return 2

    from pretrain.checkpoint import CheckpointError

    try:
        cfg = evaluation_config(args.config, args.overrides, checkpoints[0])
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except (ConfigError, CheckpointError) as exc:
        report_fatal(str(exc))
        return 2

    from pretrain.platform import process_group_teardown

    with process_group_teardown():  # on success, error and SIGTERM alike
        try:
            evaluate_checkpoints(cfg, checkpoints, Path(args.out) if args.out else None)
        except (CheckpointError, ConfigError, FileNotFoundError) as exc:
            report_fatal(str(exc))
            return 1
    return 0


if __name__ == "__main__":  # keep the guard: checkpoint loading may start worker processes
    sys.exit(main())
