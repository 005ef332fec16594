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

from pretrain.config import ConfigError, declared_world_size, load_config, validate
from pretrain.fatal import report_fatal


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Megatron-core pre-training with PMA checkpoint merging.",
        epilog="Overrides: section.key=value, e.g. train.train_iters=100 parallel.tensor_model_parallel_size=2",
    )
    parser.add_argument("--config", "-c", help="YAML run config (default: the built-in defaults)")
    parser.add_argument("--validate-only", action="store_true", help="check the config against the launch and exit")
    # --- for --validate-only: check a cluster's launch from anywhere (e.g. a CPU login node)
    parser.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                        help="with --validate-only: the machines to check for (default: this one)")
    parser.add_argument("--world-size", type=int, metavar="N",
                        help="with --validate-only: processes of the launch (default: $WORLD_SIZE, else the "
                             "config's '# world_size: N' line, else 1)")
    parser.add_argument("--log-level", default=os.environ.get("PRETRAIN_LOG_LEVEL", "INFO"))
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if not args.validate_only and (args.target != "auto" or args.world_size is not None):
        parser.error("--target and --world-size only go with --validate-only")
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size: {args.world_size} must be >= 1")
    return args


def _launch_to_check(args: argparse.Namespace) -> tuple[int, bool | None]:
    """(world size, CUDA available) to validate against: this launch, or --validate-only's target."""
    env = os.environ.get("WORLD_SIZE")
    if not args.validate_only:
        return int(env or 1), None
    declared = declared_world_size(args.config) if args.config and os.path.isfile(args.config) else None
    world_size = args.world_size or (int(env) if env else None) or declared or 1
    return world_size, {"auto": None, "cpu": False, "cuda": True}[args.target]


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
    world_size, cuda = _launch_to_check(args)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=world_size, cuda_available=cuda)
    except ConfigError as exc:
        report_fatal(str(exc))  # every rank fails the same way: said once (pretrain.fatal)
        return 2
    if args.validate_only:
        print(f"config OK for world size {world_size}" + (f" on {args.target}" if args.target != "auto" else ""))
        return 0

    from megatron_merge.errors import MergeError
    from pretrain.checkpoint import CheckpointError
    from pretrain.platform import process_group_teardown
    from pretrain.summary import print_summary
    from pretrain.train import pretrain

    with process_group_teardown():  # on success, error and SIGTERM alike
        try:
            summary = pretrain(cfg)
        # Bad input: the message says it all. A merge of saved checkpoints (PMA-init, recovery,
        # storage: disk) fails on every rank with the same message, so it is said once too.
        except (CheckpointError, ConfigError, MergeError, FileNotFoundError) as exc:
            report_fatal(str(exc))
            return 1
        except Exception as exc:
            report_fatal(f"training failed: {type(exc).__name__}: {exc}", details=traceback.format_exc())
            return 1
        print_summary(cfg, summary)
    return 0


if __name__ == "__main__":  # the checkpoint writer starts a multiprocessing Manager: keep this guard
    sys.exit(main())
