"""In-training merging for the loop: the per-rank merger, merged checkpoints, merged evaluation.

The merging itself lives in :mod:`megatron_merge.online` (the same arithmetic as the offline
``megatron-merge``); this module connects it to the run config, the model and the checkpoint
layout: merged checkpoints go to ``<checkpoint.save>/merged/iter_NNNNNNN`` in the training
checkpoints' own torch_dist format and layout (model weights only), with a ``merge.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_merge.candidates import CandidateMerges, parse_candidates, store_needed
from megatron_merge.online import ONLINE_NONFINITE_HINT, OnlineMergeSpec, PartitionMerger, map_sharded_params
from megatron_merge.record import MERGE_RECORD_FILE, record_header
from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError, MergeSelection, RunConfig, merge_interval_iterations

logger = logging.getLogger(__name__)

MERGED_DIR = "merged"
CANDIDATES_DIR = "merged_candidates"


def merge_spec(cfg: RunConfig) -> OnlineMergeSpec:
    m = cfg.merge
    return OnlineMergeSpec(
        method=m.method,
        window=m.window,
        interval=merge_interval_iterations(cfg),
        start_iteration=m.start_iteration,
        ema_alpha=m.ema_alpha,
        weights=tuple(float(w) for w in m.weights),
        storage=m.storage,
        store=store_needed(parse_candidates(m.candidates)),
    )


def replica_group_of(param):
    """The ranks that hold the same values as this rank for ``param``, or None when alone.

    Dense parameters are replicated over the data-parallel group; expert parameters (marked
    ``allreduce=False`` by megatron-core) over the expert-data-parallel group.
    """
    if getattr(param, "allreduce", True):
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    else:
        group = parallel_state.get_expert_data_parallel_group()
    return group if group.size() > 1 else None


def partition_merger(spec: OnlineMergeSpec, model_chunks, run_dir: Optional[str]) -> PartitionMerger:
    """A merger over this rank's parameters (its TP shard, PP stage and experts)."""
    modules = [ckpt.unwrap(chunk) for chunk in model_chunks]
    named = [(f"{i}.{name}", p) for i, m in enumerate(modules) for name, p in m.named_parameters()]
    sharded = map_sharded_params(ckpt.model_sharded_state_dict(model_chunks), [p for _, p in named])
    return PartitionMerger(spec, named, sharded, replica_group_of, run_dir=run_dir)


def leave_out_hint(leave_out: str) -> str:
    """The NaN/Inf error's advice for a merge whose inputs the run config chooses: ``leave_out``
    says which keys leave a checkpoint out (the config has no override that merges NaN/Inf)."""
    return f"{ONLINE_NONFINITE_HINT}; leave it out of the merge ({leave_out})"


def install_merged_checkpoints(model_chunks, optimizer, directories, selection: MergeSelection,
                               nonfinite_hint: str = ONLINE_NONFINITE_HINT) -> list[float]:
    """Put the merge of saved checkpoints (oldest first) into the model, each rank its own part,
    weighed as ``selection`` says (with fewer checkpoints than its explicit weights, the newest
    ones' weights).

    The optimizer's main (fp32) parameters, if there is an optimizer, are reloaded from the new
    model weights. Returns the weights used. One checkpoint is loaded as it is. A failure on any
    rank raises the same MergeError on every rank; ``nonfinite_hint`` ends its NaN/Inf message.
    """
    ema = selection.method == "ema" and len(directories) > 1
    spec = OnlineMergeSpec(method=selection.method, window=max(2, len(directories)), interval=1,
                           ema_alpha=selection.ema_alpha, weights=tuple(float(w) for w in selection.weights),
                           storage="disk")
    merger = partition_merger(spec, model_chunks, run_dir=None)
    weights = spec.weights_for(len(directories))
    merged = merger.merge_checkpoints(directories, weights, ema_alpha=selection.ema_alpha if ema else None,
                                      nonfinite_hint=nonfinite_hint)
    merger.install(merged)
    if optimizer is not None:
        optimizer.reload_model_params()
    return weights


def reset_optimizer_state(optimizer) -> None:
    """Fresh Adam state (moments and step counts are recreated at the next step)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            inner.state.clear()


def build_merger(cfg: RunConfig, model_chunks) -> Optional[PartitionMerger]:
    """The in-training merger of this rank's parameters, or None when merging is off."""
    if not cfg.merge.enabled:
        return None
    merger = partition_merger(merge_spec(cfg), model_chunks, run_dir=cfg.checkpoint.save)
    span = "every snapshot" if cfg.merge.method == "ema" else f"{cfg.merge.window} snapshots"
    logger.info("in-training merging: %s over %s every %d iterations (storage %s)",
                cfg.merge.method, span, merger.spec.interval, cfg.merge.storage)
    candidates = parse_candidates(cfg.merge.candidates)
    if candidates:
        merger.candidates = CandidateMerges(merger, candidates)
        logger.info("merge candidates: %s", ", ".join(c.name for c in candidates))
    _check_store_budget(cfg, merger)
    return merger


def store_mib(merger: PartitionMerger) -> float:
    """MiB the merge store takes on this rank once full: the snapshots (primary window and
    candidates), the primary EMA accumulator and each EMA candidate's."""
    spec = merger.spec
    snapshots = 0 if spec.storage == "disk" and spec.method != "ema" else spec.store_size
    accumulators = int(spec.method == "ema")
    if merger.candidates is not None:
        accumulators += merger.candidates.accumulator_count()
    return merger.store_bytes(snapshots, accumulators) / 2**20


def _check_store_budget(cfg: RunConfig, merger: PartitionMerger) -> None:
    """State the store's memory (the largest over ranks) and refuse it beyond merge.max_store_mib (collective)."""
    from pretrain.platform import collective_device

    largest = torch.tensor([store_mib(merger)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    mib, spec = float(largest), merger.spec
    logger.info("merge store: %d snapshot(s) + %d fp32 EMA accumulator(s) = %.2f MiB on the busiest rank (%s)",
                spec.store_size if spec.storage != "disk" else 0,
                int(spec.method == "ema") + (merger.candidates.accumulator_count() if merger.candidates else 0),
                mib, spec.storage)
    budget = cfg.merge.max_store_mib
    if budget is not None and mib > budget:
        raise ConfigError(f"merge.max_store_mib: the merge store needs {mib:.2f} MiB on a rank, over the budget of "
                          f"{budget:g} MiB; shrink merge.window or the largest merge.candidates window "
                          f"(N x every), drop EMA candidates, or raise merge.max_store_mib")


def snapshot_inputs(cfg: RunConfig, iterations, weights) -> list[dict]:
    """``merge.json`` inputs of an in-training merge: the checkpoint saved at each snapshot
    iteration (None when none was), its iteration and weight."""
    run = Path(cfg.checkpoint.save)
    return [{"path": str(ckpt.iteration_dir(run, it).resolve()) if ckpt.iteration_dir(run, it).exists() else None,
             "iteration": it, "weight": w} for it, w in zip(iterations, weights)]


def merge_record(cfg: RunConfig, merger: PartitionMerger, out: Path) -> dict:
    """The ``merge.json`` of an in-training merged checkpoint (the offline tool's fields)."""
    weights = merger.weights()
    inputs = snapshot_inputs(cfg, merger.iterations[-len(weights):], weights)
    return {
        **record_header(tool="pretrain (in-training merge)", out=out, format="torch_dist",
                        method=merger.spec.method,
                        alpha=merger.spec.ema_alpha if merger.spec.method == "ema" else None,
                        weights=weights, inputs=inputs),
        "snapshots": merger.count,
        "interval_iterations": merger.spec.interval,
        "window": merger.spec.window,
        "storage": merger.spec.storage,
        "accumulate_dtype": "fp32",
        "model_only": True,
        "merged": "every floating-point parameter",
        "copied_from_newest": "non-parameter model state (e.g. Transformer Engine _extra_state) from the live model",
        "dropped": "optimizer state, RNG state",
    }


def save_merged_checkpoint(cfg: RunConfig, merger: PartitionMerger, model_chunks, state) -> Path:
    """Write the merged weights as ``<save>/merged/iter_N`` (collective)."""
    root = Path(cfg.checkpoint.save) / MERGED_DIR
    final = ckpt.iteration_dir(root, state.iteration)
    with merger.merged_weights_in_model():
        sd = ckpt.model_sharded_state_dict(model_chunks)
        sd.update(ckpt.common_entries(cfg, state))
        sd["merge"] = merger.describe()
        record = json.dumps(merge_record(cfg, merger, final), indent=2) + "\n"
        return ckpt.write_checkpoint(sd, root, state.iteration, cfg, extra_files={MERGE_RECORD_FILE: record})


def save_candidate_checkpoints(cfg: RunConfig, merger: PartitionMerger, model_chunks, state) -> list[Path]:
    """Write each ready candidate's merge as ``<save>/merged_candidates/<name>/iter_N`` (collective)."""
    candidates = merger.candidates
    written = []
    with merger.raw_weights_kept():
        for c in candidates.ready():
            iterations, weights = candidates.plan(c)
            root = Path(cfg.checkpoint.save) / CANDIDATES_DIR / c.slug
            final = ckpt.iteration_dir(root, state.iteration)
            merger.install(candidates.merged_owned(c))
            sd = ckpt.model_sharded_state_dict(model_chunks)
            sd.update(ckpt.common_entries(cfg, state))
            inputs = snapshot_inputs(cfg, iterations, weights)
            record = {**record_header(tool="pretrain (merge candidate)", out=final, format="torch_dist",
                                      method=c.method, alpha=c.alpha, weights=weights, inputs=inputs),
                      "candidate": c.name, "snapshots": len(iterations), "model_only": True}
            written.append(ckpt.write_checkpoint(sd, root, state.iteration, cfg,
                                                 extra_files={MERGE_RECORD_FILE: json.dumps(record, indent=2) + "\n"}))
    return written
