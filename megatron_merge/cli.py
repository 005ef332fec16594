"""``megatron-merge``: merge Megatron and DeepSpeed checkpoints offline, in their own format.

Formats (detected from the inputs; ``--format`` overrides): megatron-core ``torch_dist``
(merged chunk by chunk), legacy Megatron ``torch`` (``mp_rank_*`` directories) and DeepSpeed
(``global_step*`` tag directories), both merged file by file.

Examples::

    megatron-merge --out merged/ run/iter_0001000 run/iter_0002000 run/iter_0003000
    megatron-merge --method ema --alpha 0.2 --last 10 --every 2 --out merged/ run/
    megatron-merge --method weights --weights 1,2,3 --iterations 1000,2000,3000 --out m/ run/
    megatron-merge --dry-run --last 10 --out merged/ run/
    megatron-merge --last 3 --out merged/global_step300 ds_run/      # DeepSpeed save dir
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m megatron_merge --last 10 --out /shared/merged /shared/run/   # 32 ranks, 4 nodes

Exit status: 0 on success, 1 on bad input or a failed check (an ``error:`` line names the file
and key; nothing is written), 2 on bad command-line usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from megatron_merge.errors import FailedOnAnotherRank, MergeError, os_error_message
from megatron_merge.ranks import RankGroup, usable_cores
from megatron_merge.weights import METHODS, parse_weight_list, unusual_weights

logger = logging.getLogger("megatron_merge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-merge",
        description="Merge Megatron (torch_dist, legacy torch) and DeepSpeed checkpoints "
        "(PMA: SMA / EMA / WMA / WSM) piece by piece, in their own format and layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Checkpoints are ordered oldest first. The output keeps the newest input's "
        "sharding and files; optimizer state, non-float tensors and opaque objects come from the "
        "newest input (see merge.json in the output). Under torchrun (one or many nodes) the "
        "output files are split over all ranks; inputs and --out must be on a filesystem every "
        "node sees.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="checkpoint directories (iter_*, or DeepSpeed global_step*), oldest "
                        "first; or one run directory with --last/--iterations")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")

    weights = parser.add_argument_group("weights")
    weights.add_argument("--method", choices=METHODS, default=None,
                         help="sma (default), ema, wma, explicit 'weights', or WSM decay-equivalent "
                         "wsm-linear / wsm-minus-sqrt")
    weights.add_argument("--alpha", type=float, help="EMA factor in (0, 1] (default 0.2)")
    weights.add_argument("--weights", type=parse_weight_list,
                         help="comma-separated weights, one per checkpoint (method 'weights'; "
                         "implies it when --method is not given); a negative first one needs the "
                         "--weights=-0.5,1.5 form")
    weights.add_argument("--no-normalize", action="store_true",
                         help="use --weights as given instead of dividing by their sum: any values, "
                         "negative ones included, not all zero (a warning says when they do not sum to 1)")

    select = parser.add_argument_group("choosing checkpoints from a run directory")
    select.add_argument("--last", type=int, metavar="N", help="merge the newest N saved iterations")
    select.add_argument("--every", type=int, metavar="K",
                        help="with --last: every K-th saved iteration counting back from the newest")
    select.add_argument("--iterations", type=_int_list, metavar="A,B,C",
                        help="merge exactly these saved iterations")

    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument("--format", choices=("torch_dist", "torch", "deepspeed"), default=None,
                           help="checkpoint format (default: detected from the inputs)")
    behaviour.add_argument("--model-only", action="store_true",
                           help="drop optimizer state (default: copy it from the newest input)")
    behaviour.add_argument("--accumulate-dtype", choices=("fp32", "fp64"), default="fp32")
    behaviour.add_argument("--save-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                           help="dtype of the merged model weights (default: their own); the "
                           "optimizer's fp32 master weights and copied state keep theirs")
    behaviour.add_argument("--state-from", default="newest", metavar="{newest,oldest,ITERATION}",
                           help="the input whose layout and unmerged state (optimizer moments, RNG, "
                           "extra state, args) the output takes (default: newest)")
    behaviour.add_argument("--allow-nonfinite", action="store_true",
                           help="merge inputs holding NaN/Inf instead of refusing")
    behaviour.add_argument("--trust-inputs", action="store_true",
                           help="copy opaque parts (common.pt, RNG and extra-state items) without "
                           "first parsing them with the safe reader; recorded in merge.json")
    behaviour.add_argument("--force", action="store_true", help="replace an existing --out")
    behaviour.add_argument("--as-run-dir", action="store_true",
                           help="write OUT as a run directory: OUT/iter_N/ (DeepSpeed: "
                                "OUT/global_stepN/, N the newest input's iteration) and the tracker "
                                "file, for Megatron-LM's --load OUT / DeepSpeed's load_checkpoint")
    behaviour.add_argument("--workers", type=int, default=None, metavar="P",
                           help="processes splitting the output files (default: chosen from the "
                           "cores, the input size and free memory, and logged); under torchrun "
                           "every rank is one process")
    behaviour.add_argument("--dry-run", action="store_true",
                           help="check the inputs, print the plan and projected memory, write nothing")
    behaviour.add_argument("--verify", action="store_true",
                           help="re-read sampled output chunks via torch's DCP reader and compare "
                           "with an independent recomputation before publishing the output")
    behaviour.add_argument("--no-progress", action="store_true", help="no progress bar")
    behaviour.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _state_from(text: str) -> str | int:
    if text in ("newest", "oldest"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--state-from: expected newest, oldest or an iteration, got {text!r}") from None


def _warn_about_choices(args: argparse.Namespace) -> None:
    """Say when a choice the user made is likely not what they want (the merge still runs)."""
    cores = usable_cores()
    if args.workers is not None and args.workers > cores:
        logger.warning("--workers %d is more than the %d CPU cores available: processes compete for them, "
                       "which is slower than --workers %d", args.workers, cores, cores)
    if args.no_normalize and args.weights is not None:
        why = unusual_weights(args.weights)
        if why:
            logger.warning("--no-normalize: weights %s are used as given: %s", args.weights, why)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(  # other libraries' (megatron-core's) INFO chatter stays out
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    method = args.method or ("weights" if args.weights is not None else "sma")
    if method == "weights" and args.weights is None:
        parser.error("--method weights needs --weights W1,W2,... (one per checkpoint, oldest first)")
    if args.no_normalize and args.weights is None:
        parser.error("--no-normalize applies to --weights W1,W2,...")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        state_from = _state_from(args.state_from)
    except ValueError as err:
        parser.error(str(err))
    group = RankGroup.from_env()
    if group is not None and not group.is_coordinator:  # under torchrun rank 0 speaks for the merge
        logger.setLevel(logging.WARNING)
    _warn_about_choices(args)
    try:
        return _run(args, method, state_from)
    except FailedOnAnotherRank:  # rank 0 says why
        return 1
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. an unreadable input during --dry-run
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, method: str, state_from: str | int) -> int:
    # Imported here so `--help` and usage errors stay fast (torch loads in ~2 s).
    from megatron_merge.atomic_output import check_output_path
    from megatron_merge.offline import merge_checkpoints, plan_merge
    from megatron_merge.selection import select_checkpoints

    refs = select_checkpoints(args.inputs, last=args.last, every=args.every, iterations=args.iterations)
    options = dict(
        alpha=args.alpha, weights=args.weights, normalize=not args.no_normalize,
        model_only=args.model_only, accumulate_dtype=args.accumulate_dtype, format=args.format,
        trust_inputs=args.trust_inputs, save_dtype=args.save_dtype, state_from=state_from,
    )
    group = RankGroup.from_env()
    if args.dry_run:  # writes nothing, so an existing --out is only reported
        if group is not None and not group.is_coordinator:
            return 0
        exists = os.path.lexists(args.out)
        check_output_path(args.out, [r.path for r in refs], force=True)
        plan = plan_merge(refs, method, **options)
        print(plan.describe())
        if group is not None:
            print(f"ranks: {group.world_size} (torchrun), each writing its share of the "
                  f"{len(plan.work_items)} files")
        elif args.workers is None:
            print("workers: %d (%s)" % plan.auto_workers())
        note = "; it exists: the merge needs --force to replace it" if exists and not args.force else ""
        print(f"output: {args.out} (dry run: nothing written{note})")
        return 0
    result = merge_checkpoints(
        refs, args.out, method, **options,
        allow_nonfinite=args.allow_nonfinite, force=args.force, workers=args.workers,
        verify=args.verify, progress=not args.no_progress, as_run_dir=args.as_run_dir,
    )
    if result.plan is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    size = result.plan.bytes_to_write
    logger.info(
        "merged %d checkpoints into %s in %.1f s (%.1f MiB/s, %d %s)%s",
        len(result.plan.inputs), result.out, result.seconds,
        size / 2**20 / max(result.seconds, 1e-9), result.workers,
        "ranks" if group is not None else "process" if result.workers == 1 else "processes",
        f"; verified {result.verified_chunks} chunks" if args.verify else "",
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
