"""Save and resume in Megatron's torch_dist layout.

    <save>/latest_checkpointed_iteration.txt     the newest complete iteration
    <save>/iter_0000100/                          megatron-core dist_checkpointing (PyTorch DCP):
        __0_0.distcp ...  .metadata  common.pt  metadata.json  run_config.yaml

Sharded content: ``model`` (``model0``, ``model1``, ... with virtual pipeline
stages), ``optimizer`` (megatron-core's sharded optimizer state, reshardable
across TP/PP/DP) and ``rng_state`` (one object per rank). Common content:
``iteration``, ``consumed_samples``, ``opt_param_scheduler``, the parallel
layout and the resolved run config.

A checkpoint becomes visible only when complete: everything is written to
``iter_NNNNNNN.incomplete`` and renamed once every rank has finished, then
the tracker file is replaced atomically. A crash mid-save leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from torch.distributed.checkpoint.api import CheckpointException

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_merge import safe_dist_checkpointing
from megatron_merge.errors import MergeError
from megatron_merge.safe_load import check_objects, read_dcp_metadata
from pretrain import megatron_lm_checkpoint as megatron_lm
from pretrain.config import RunConfig, save_config, to_dict

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "run_config.yaml"
CHECKPOINT_VERSION = 3.0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or used; the message names the path."""


@dataclass
class TrainState:
    """Where training stands: restored exactly on resume."""

    iteration: int = 0
    consumed_samples: int = 0
    # How a resume read this state (who wrote the checkpoint, from which fields): for the
    # metrics' `resume` record; not saved.
    resume_facts: dict = field(default_factory=dict, repr=False, compare=False)


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str | Path) -> Optional[int]:
    """The newest complete iteration recorded in ``root``, or None if there is none."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}") from None


def read_common(directory: str | Path) -> dict:
    """``common.pt`` of a torch_dist checkpoint, read by the safe reader (no code runs from it)."""
    try:
        return safe_dist_checkpointing.load_common_state_dict(directory)
    except MergeError as err:
        raise CheckpointError(str(err)) from None


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds a whole saved checkpoint (torch_dist or legacy)."""
    from pretrain.legacy_checkpoint import is_legacy_checkpoint

    return (Path(directory) / "metadata.json").is_file() or is_legacy_checkpoint(directory)


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """Map ``checkpoint.load`` (a run directory, an ``iter_*`` directory or any checkpoint directory,
    e.g. a merge output) to (dir, iteration)."""
    path = Path(path)
    if path.name.startswith("iter_") and path.is_dir():
        try:
            return path, int(path.name[len("iter_"):])
        except ValueError:
            raise CheckpointError(f"{path}: directory name is not iter_NNNNNNN") from None
    from pretrain.legacy_checkpoint import is_legacy_checkpoint, stored_iteration

    if is_legacy_checkpoint(path):  # a legacy-format checkpoint under another name (a merge output)
        return path, stored_iteration(path)
    if (path / "metadata.json").is_file() and (path / "common.pt").is_file():  # a torch_dist checkpoint, any name
        common = read_common(path)
        if "iteration" not in common:
            raise CheckpointError(f"{path / 'common.pt'}: key 'iteration' missing (not a pretrain checkpoint)")
        return path, int(common["iteration"])
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"{path}: no {TRACKER_FILE} (not a run directory with a saved checkpoint)")
    directory = iteration_dir(path, iteration)
    if not is_complete(directory):
        raise CheckpointError(f"{directory}: checkpoint named by {path / TRACKER_FILE} is missing or incomplete")
    return directory, iteration


def truncated_files(directory: str | Path) -> list[str]:
    """Tensor files shorter than the byte ranges the checkpoint's .metadata records for them."""
    try:
        metadata = read_dcp_metadata(directory)
    except MergeError:
        return [".metadata"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    damaged = []
    for name, size in sorted(needed.items()):
        path = Path(directory) / name
        if not path.is_file() or path.stat().st_size < size:
            damaged.append(name)
    return damaged


def _describe_failure(exc: BaseException, limit: int = 600) -> str:
    """One readable line for a failed load (DCP wraps per-rank errors with full tracebacks)."""
    if isinstance(exc, CheckpointException):
        errors = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
        causes = {f"{type(e).__name__}: {e}".strip().rstrip(":") for e in errors}
        text = f"reading the tensor files failed on ranks {sorted(exc.failures)} ({'; '.join(sorted(causes))})"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _layout() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "np_random": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np_random"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data) -> ShardedObject:
    # One object per rank, addressed by its (PP, TP, DP) coordinates.
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def unwrap(chunk):
    """The GPTModel inside its DDP and Float16Module wrappers (state dict keys carry no 'module.')."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(model_chunks) -> dict:
    """The sharded model state of this rank: ``model`` or ``model0``, ``model1``, ..."""
    return {_model_key(i, len(model_chunks)): unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _sharded_state_dict(model_chunks, optimizer, scheduler, state: TrainState, cfg: RunConfig,
                        include_optimizer: bool, include_rng: bool, is_loading: bool,
                        optimizer_sharding: Optional[str] = None, megatron_lm_rng: bool = False) -> dict:
    """``optimizer_sharding`` (default: the config's) and ``megatron_lm_rng`` (Megatron-LM's RNG
    layout) describe a checkpoint being loaded."""
    sd = model_sharded_state_dict(model_chunks)
    if include_optimizer:
        sharding = optimizer_sharding or cfg.checkpoint.optimizer_sharding
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": sharding,
                                              # one key per parameter whether or not megatron-core splits
                                              # the optimizer (it chains dense and expert ones at EP > 1),
                                              # so optimizer state reshards across EP sizes too
                                              "chained_optim_avoid_prefix": True}
        )
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if include_rng and megatron_lm_rng:
        sd["rng_state"] = megatron_lm.rng_sharded_object()
    elif include_rng:
        sd["rng_state"] = _rng_sharded_object(_rng_state() if not is_loading else None)
    sd.update(common_entries(cfg, state))
    return sd


def common_entries(cfg: RunConfig, state: TrainState) -> dict:
    """The non-sharded part of a checkpoint (common.pt): where training stands and how it ran."""
    return {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "checkpoint_version": CHECKPOINT_VERSION,
        "parallel_layout": _layout(),
        "use_distributed_optimizer": cfg.parallel.use_distributed_optimizer,
        "run_config": to_dict(cfg),
    }


def _materialize_optimizer_state(optimizer) -> None:
    """Create Adam's lazily allocated state before a distributed-optimizer load.

    Without Transformer Engine or apex, megatron-core's DistributedOptimizer
    reads each parameter's Adam ``step`` while building the state dict to load
    into, and fresh torch Adam has none yet. One step with zero gradients, zero
    learning rate and zero weight decay creates the state without moving any
    weight; the load then overwrites it.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0 or not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        opt._init_optimizer_states_with_dummy_values()
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


def _chained_count(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_parts(state: dict) -> list[dict]:
    """Per-optimizer parts of an optimizer state dict: ``{0: ..., 1: ...}`` when megatron-core
    chains several optimizers, the dict itself when it has one."""
    if state and all(isinstance(key, int) for key in state):
        return [state[key] for key in sorted(state)]
    return [state]


def _groups_holder(part: dict) -> dict:
    """The dict holding ``param_groups``: the part itself, or its inner ``optimizer`` (the
    distributed and mixed-precision optimizers nest torch's state dict there)."""
    return part if "param_groups" in part else part["optimizer"]


def _adopt_optimizer_common(loaded: dict, runtime: dict, saved: dict) -> dict:
    """The loaded optimizer state, restructured for this run's optimizer chain.

    At EP > 1 megatron-core chains a dense and an expert optimizer, at EP = 1 it has one. Their
    tensor state is keyed per parameter (``chained_optim_avoid_prefix``), so it reshards across
    that boundary like the weights and is already in this run's structure in ``loaded``; the
    non-tensor part -- ``param_groups`` and the step count -- comes from ``common.pt`` in the
    saved structure. Here each of this run's optimizers gets its own ``param_groups`` (this run's
    hyperparameters; the LR follows the scheduler anyway) with the saved step count, which
    megatron-core keeps equal across chained optimizers.
    """
    saved_parts = _optimizer_parts(saved)
    saved_holder = _groups_holder(saved_parts[0])
    common_step = saved_holder.get("state", {}).get("common_step")  # plain and mixed-precision
    group_step = saved_holder["param_groups"][0].get("step")  # distributed optimizer
    runtime_parts = _optimizer_parts(runtime)
    if len(runtime_parts) == 1:
        parts = [{key: value for key, value in loaded.items() if not isinstance(key, int)}]
    else:
        parts = [loaded[i] for i in range(len(runtime_parts))]
    for part, runtime_part in zip(parts, runtime_parts):
        for key, value in saved_parts[0].items():  # e.g. param_state_sharding_type
            if key not in ("optimizer", "param_groups", "state"):
                part.setdefault(key, copy.deepcopy(value))
        runtime_holder = _groups_holder(runtime_part)
        holder = part if runtime_holder is runtime_part else part.setdefault("optimizer", {})
        loaded_groups = holder.get("param_groups", [])
        groups = []
        for i, runtime_group in enumerate(runtime_holder["param_groups"]):
            group = {key: value for key, value in runtime_group.items() if key != "params"}
            if "params" in runtime_group:  # torch's own layout: the loaded (unwrapped) ids
                group["params"] = loaded_groups[i]["params"]
            if group_step is not None:
                group["step"] = group_step
            groups.append(group)
        holder["param_groups"] = groups
        if common_step is not None:
            holder.setdefault("state", {})["common_step"] = common_step
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))


def write_checkpoint(sharded_state_dict: dict, root: str | Path, iteration: int, cfg: RunConfig,
                     extra_files: Optional[dict] = None, saver=None,
                     on_published: Optional[Callable[[], None]] = None) -> Path:
    """Save ``sharded_state_dict`` as ``<root>/iter_NNNNNNN`` atomically and point the tracker at it.

    Collective: every rank calls it. ``extra_files`` (name -> text) are written beside the
    tensors (by rank 0) before the directory becomes visible; then rank 0 calls
    ``on_published``. With ``saver`` (a :class:`~pretrain.async_save.AsyncCheckpointSaver`)
    the files are written in the background and published when the saver finds them complete.
    """
    root = Path(root)
    final = iteration_dir(root, iteration)
    staging = final.with_name(final.name + ".incomplete")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left by a crash during an earlier save
            shutil.rmtree(staging)
        staging.mkdir()
    dist.barrier()

    def publish() -> None:
        if rank == 0:
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text)
            publish_checkpoint(cfg, staging, final, iteration)
            logger.info("saved checkpoint %s", final)
            if on_published is not None:
                on_published()

    if saver is not None:
        saver.schedule(dist_checkpointing.save(sharded_state_dict, str(staging), async_sharded_save=True), publish)
        return final
    dist_checkpointing.save(sharded_state_dict, str(staging))
    dist.barrier()
    publish()
    dist.barrier()
    return final


def publish_checkpoint(cfg: RunConfig, staging: Path, final: Path, iteration: int) -> None:
    """Rank 0, once every rank has written into ``staging``: add the resolved config, rename it
    into place (replacing a previous save of the same iteration only now), point the tracker at it."""
    save_config(cfg, staging / CONFIG_FILE)
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():  # left by a kill inside an earlier replace: final is complete
            shutil.rmtree(old)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    tracker = final.parent / TRACKER_FILE
    tmp = tracker.with_name(tracker.name + ".tmp")
    tmp.write_text(f"{iteration}\n")
    tmp.replace(tracker)


def recover_interrupted_saves(root: str | Path) -> list[str]:
    """Finish or remove what a killed save left in ``root`` and ``root/merged``; returns one line
    per action for the log. Rank 0 calls it at start-up, before anything reads the tracker.

    ``iter_N.old`` (a kill inside :func:`publish_checkpoint`'s replace): removed if ``iter_N`` is
    there; else the publish is finished from the complete ``iter_N.incomplete``, or ``iter_N.old``
    is put back. Any other ``iter_N.incomplete`` (a kill during the save) is removed, and so is any
    ``iter_N.deleting`` (a kill during a retention deletion). A merged
    checkpoint missing for the newest training checkpoint (its save was interrupted) is reported.
    """
    root = Path(root)
    actions = []
    for base in (root, root / "merged", *sorted((root / "merged_candidates").glob("*/"))):
        if not base.is_dir():
            continue
        for old in sorted(base.glob("iter_*.old")):
            final = old.with_name(old.name[: -len(".old")])
            staging = final.with_name(final.name + ".incomplete")
            if final.exists():
                shutil.rmtree(old)
                actions.append(f"removed {old}: left by an interrupted replace of the complete {final}")
            elif staging.exists():
                staging.rename(final)
                shutil.rmtree(old)
                actions.append(f"finished publishing {final}: its save was complete, the rename was interrupted")
                if (read_tracker(base) or -1) < int(final.name[len("iter_"):]):
                    (base / TRACKER_FILE).write_text(f"{int(final.name[len('iter_'):])}\n")
            else:
                old.rename(final)
                actions.append(f"restored {final} from {old}")
        for staging in sorted(base.glob("iter_*.incomplete")):
            shutil.rmtree(staging)
            actions.append(f"removed {staging}: left by a save that was killed before it completed")
        for doomed in sorted(base.glob("iter_*.deleting")):  # pretrain.retention renames before deleting
            shutil.rmtree(doomed)
            actions.append(f"finished deleting {doomed}: a retention deletion was interrupted")
    try:
        newest = read_tracker(root)
    except CheckpointError:
        newest = None
    merged = root / "merged"
    if newest is not None and any(merged.glob("iter_???????")) and not iteration_dir(merged, newest).exists():
        actions.append(f"the merged checkpoint {iteration_dir(merged, newest)} was not written (its save was "
                       f"interrupted); produce it with megatron-merge from the training checkpoints if you need it")
    return actions


def save_checkpoint(cfg: RunConfig, model_chunks, optimizer, scheduler, state: TrainState,
                    root: Optional[str | Path] = None, merger=None, saver=None,
                    on_published: Optional[Callable[[], None]] = None) -> Path:
    """Write a complete training checkpoint of ``state.iteration`` under ``root`` (default checkpoint.save).

    With ``merger`` (an in-training :class:`~megatron_merge.online.PartitionMerger`) its merge
    state is saved too, sharded like the parameters. ``saver`` and ``on_published``: as
    :func:`write_checkpoint` (torch_dist only).
    """
    if cfg.checkpoint.format == "torch":  # Megatron's legacy layout: pretrain/legacy_checkpoint.py
        if merger is not None:
            raise CheckpointError("checkpoint.format: torch cannot hold the in-training merge state; use torch_dist")
        from pretrain.legacy_checkpoint import save_legacy_checkpoint

        final = save_legacy_checkpoint(cfg, model_chunks, optimizer, scheduler, state, root)
        if on_published is not None and dist.get_rank() == 0:
            on_published()
        return final
    sd = _sharded_state_dict(model_chunks, optimizer, scheduler, state, cfg,
                             include_optimizer=True, include_rng=True, is_loading=False)
    if merger is not None:
        sd["merge_state"] = merger.sharded_state_dict()
        sd["merge_state_meta"] = merger.common_state()
    return write_checkpoint(sd, root or cfg.checkpoint.save, state.iteration, cfg, saver=saver,
                            on_published=on_published)


def load_checkpoint(cfg: RunConfig, model_chunks, optimizer, scheduler, path: str | Path,
                    load_optimizer: bool = True, load_rng: bool = True, merger=None) -> TrainState:
    """Restore model (and optimizer, scheduler, RNG) from ``path``; megatron-core reshards as needed."""
    directory, _ = resolve_checkpoint(path)
    from pretrain.legacy_checkpoint import is_legacy_checkpoint, load_legacy_checkpoint

    if is_legacy_checkpoint(directory):  # the format is told by the directory's contents
        return load_legacy_checkpoint(cfg, model_chunks, optimizer, scheduler, directory, load_optimizer, load_rng)
    common = read_common(directory)
    try:  # refuse a hostile or damaged .metadata or object before any state is touched
        check_objects(directory, read_dcp_metadata(directory))
    except MergeError as err:
        raise CheckpointError(str(err)) from None
    if "iteration" not in common:
        raise CheckpointError(f"{directory / 'common.pt'}: key 'iteration' missing (not a pretrain checkpoint)")
    mlm_args = megatron_lm.megatron_lm_args(common)
    if mlm_args is not None and "consumed_samples" not in common:  # written by Megatron-LM
        state = TrainState(iteration=int(common["iteration"]),
                           consumed_samples=megatron_lm.consumed_samples(mlm_args))
        saved_layout = megatron_lm.saved_layout(mlm_args)
        saved_dist_opt = bool(mlm_args.get("use_distributed_optimizer"))
        saved_sharding = megatron_lm.optimizer_sharding(common)
        # Megatron-LM counts scheduler steps in samples; the loop re-aligns them to the iteration
        state.resume_facts = {"written_by": "Megatron-LM",
                              "consumed_samples_from": "args.consumed_train_samples",
                              "optimizer_sharding": saved_sharding}
    else:
        mlm_args = None
        state = TrainState(iteration=int(common["iteration"]), consumed_samples=int(common.get("consumed_samples", 0)))
        saved_layout = common.get("parallel_layout")
        saved_dist_opt = common.get("use_distributed_optimizer", cfg.parallel.use_distributed_optimizer)
        saved_sharding = None

    if load_rng and saved_layout != _layout():
        logger.info("checkpoint layout %s differs from this run's %s: RNG states not restored", saved_layout, _layout())
        load_rng = False
    has_optimizer = load_optimizer and "opt_param_scheduler" in common
    if load_optimizer and not has_optimizer:
        logger.warning("%s holds no optimizer state: starting a fresh optimizer", directory)
    if has_optimizer and saved_dist_opt != cfg.parallel.use_distributed_optimizer:
        raise CheckpointError(
            f"{directory}: optimizer state was saved with use_distributed_optimizer={saved_dist_opt}, this run has "
            f"parallel.use_distributed_optimizer={cfg.parallel.use_distributed_optimizer}; "
            "set checkpoint.resume_optimizer=fresh to load the weights with a fresh optimizer"
        )
    # megatron-core chains separate dense and expert optimizers only at EP > 1: across that
    # boundary the optimizer's non-tensor part is rebuilt for this run (see _adopt_optimizer_common).
    saved_optimizer_parts = _optimizer_parts(common.get("optimizer", {}))
    rechain = has_optimizer and len(saved_optimizer_parts) != _chained_count(optimizer)
    if rechain and cfg.parallel.use_distributed_optimizer and any(
            part.get("param_state_sharding_type") != "fully_reshardable" for part in saved_optimizer_parts):
        saved_ep = (saved_layout or {}).get("expert_model_parallel_size", 1)
        raise CheckpointError(
            f"{directory}: distributed-optimizer state saved at expert_model_parallel_size={saved_ep} in a format "
            f"other than fully_reshardable cannot be loaded at EP={_layout()['expert_model_parallel_size']} "
            "(megatron-core keys it by optimizer); set checkpoint.resume_optimizer=fresh to load the weights "
            "with a fresh optimizer"
        )
    if has_optimizer and cfg.parallel.use_distributed_optimizer:
        _materialize_optimizer_state(optimizer)

    sd = _sharded_state_dict(model_chunks, optimizer, scheduler, state, cfg,
                             include_optimizer=has_optimizer, include_rng=load_rng, is_loading=True,
                             optimizer_sharding=saved_sharding, megatron_lm_rng=mlm_args is not None)
    for key in common_entries(cfg, state):
        sd.pop(key)
    if has_optimizer:
        sd.pop("opt_param_scheduler")
    merge_meta = common.get("merge_state_meta")
    if merger is not None and merge_meta is not None:
        sd["merge_state"] = merger.sharded_state_dict(is_loading=True, saved=merge_meta)
    try:
        loaded = safe_dist_checkpointing.load(sd, directory)
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        refused = safe_dist_checkpointing.merge_error_in(exc)
        if refused is not None:  # the safe reader refused a part: its message names file and key
            raise CheckpointError(str(refused)) from None
        damaged = truncated_files(directory)
        if damaged:
            raise CheckpointError(f"{directory}: truncated tensor file(s) {', '.join(damaged)}") from None
        raise CheckpointError(f"{directory}: cannot load into this model: {_describe_failure(exc)}") from None

    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))])
    if has_optimizer:
        if rechain:
            loaded["optimizer"] = _adopt_optimizer_common(loaded["optimizer"], sd["optimizer"], common["optimizer"])
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["opt_param_scheduler"])
    else:
        # The optimizer's main (fp32) parameters were copied from the initial weights when it was
        # built; without loaded optimizer state they must follow the loaded weights.
        optimizer.reload_model_params()
    if load_rng:
        saved_rng = loaded["rng_state"]
        _set_rng_state(megatron_lm.rng_state(saved_rng) if mlm_args is not None else saved_rng)
    state.resume_facts.update(rng_restored=load_rng, optimizer_restored=has_optimizer)
    if merger is not None and merge_meta is not None:
        merger.load_state(merge_meta, loaded.get("merge_state", {}))
    logger.info("loaded checkpoint %s (iteration %d, %d samples consumed)", directory, state.iteration, state.consumed_samples)
    return state
