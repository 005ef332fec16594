"""Entry point: ``torchrun --nproc-per-node N -m pretrain --config X.yaml [section.key=value ...]``.

The config is loaded and validated against the launch (world size) before any
process group starts, so a bad config fails fast on every rank with the same
message and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from pretrain.config import ConfigError, load_config, validate
from pretrain.fatal import report_fatal


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Megatron-core pre-training with PMA checkpoint merging.",
        epilog="Overrides: section.key=value, e.g. train.train_iters=100 parallel.tensor_model_parallel_size=2",
    )
    parser.add_argument("--config", "-c", help="YAML run config (default: the built-in defaults)")
    parser.add_argument("--validate-only", action="store_true", help="check the config against the launch and exit")
    parser.add_argument("--log-level", default=os.environ.get("PRETRAIN_LOG_LEVEL", "INFO"))
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def _configure_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=level.upper() if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # megatron-core logs every layer it builds at INFO; keep its warnings.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def main(argv=None) -> int:
    args = parse_args(argv)
    _configure_logging(args.log_level)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=world_size)
    except ConfigError as exc:
        report_fatal(str(exc))  # every rank fails the same way: said once (pretrain.fatal)
        return 2
    if args.validate_only:
        print(f"config OK for world size {world_size}")
        return 0

    from pretrain.platform import shutdown
    from pretrain.summary import print_summary
    from pretrain.train import pretrain

    from pretrain.checkpoint import CheckpointError

    try:
        summary = pretrain(cfg)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:  # bad input: the message says it all
        report_fatal(str(exc))
        return 1
    except Exception as exc:
        report_fatal(f"training failed: {type(exc).__name__}: {exc}", details=traceback.format_exc())
        return 1
    print_summary(cfg, summary)
    shutdown()
    return 0


if __name__ == "__main__":  # the checkpoint writer starts a multiprocessing Manager: keep this guard
    sys.exit(main())
