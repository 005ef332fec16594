"""Save and resume in Megatron's legacy ``torch`` layout (``checkpoint.format: torch``).

    <save>/latest_checkpointed_iteration.txt     the newest complete iteration
    <save>/iter_0000100/                          one torch.save file per model-parallel rank:
        mp_rank_00/model_optim_rng.pt             TP rank 0            (PP = EP = 1)
        mp_rank_01_000/model_optim_rng.pt         TP rank 1, PP rank 0 (PP > 1; EP > 1 adds _EEE)
        run_config.yaml

Each file is what Megatron-LM's ``generate_state_dict`` writes for the ``torch`` format:
``args`` (here a plain dict: the parallel layout and the resolved run config, not a
Namespace), ``checkpoint_version``, ``iteration``, ``model`` (``model0``, ``model1``, ... with
virtual pipeline stages: the module ``state_dict_for_save_checkpoint()``), ``optimizer``
(``optimizer.state_dict()``), ``opt_param_scheduler``, ``rng_state`` (a one-element list, as
Megatron-LM stores it) and ``consumed_samples``. The first data-parallel rank of each
(TP, PP, EP) coordinate writes it.

The legacy format does not reshard: a checkpoint loads only at the TP/PP/EP layout it was saved
at (the data-parallel size may change). The distributed optimizer, whose state Megatron-LM keeps
in separate per-rank ``distrib_optim.pt`` files, is loaded from them (megatron-core's
``load_parameter_state``; data-parallel size may change) but not saved in this format (a config
error: ``pretrain`` saves the distributed optimizer in torch_dist).

A checkpoint becomes visible only when complete (``iter_NNNNNNN.incomplete`` renamed once every
rank has written), then the tracker file is replaced atomically -- as for torch_dist.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_merge.errors import MergeError
from megatron_merge.safe_load import load_torch
from pretrain.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    TrainState,
    _layout,
    _model_key,
    _rng_state,
    _set_rng_state,
    iteration_dir,
    publish_checkpoint,
    unwrap,
)
from pretrain import megatron_lm_checkpoint as megatron_lm
from pretrain.config import RunConfig, to_dict

logger = logging.getLogger(__name__)

MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"  # Megatron-LM's distributed-optimizer state, per rank
RANK_DIR_PREFIX = "mp_rank_"


def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, pp_size: int, ep_size: int) -> str:
    """Megatron-LM's per-rank directory name (``get_checkpoint_name``)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def _my_rank_dir() -> str:
    return rank_dir_name(
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_expert_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )


def is_legacy_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory in the legacy layout (holds ``mp_rank_*/``)."""
    path = Path(path)
    return path.is_dir() and any(
        child.name.startswith(RANK_DIR_PREFIX) and (child / MODEL_FILE).is_file()
        for child in path.iterdir()
    )


def load_rank_file(path: Path) -> dict:
    """One ``model_optim_rng.pt``, read by the safe reader (``weights_only=True`` with
    Megatron-LM's ``args`` Namespace, numpy RNG state and megatron-core's safe classes)."""
    try:
        state = load_torch(path)
    except MergeError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds {type(state).__name__}, expected a dict")
    return state


def stored_iteration(directory: str | Path) -> int:
    """The ``iteration`` stored in a legacy checkpoint directory (read from its first rank file)."""
    directory = Path(directory)
    first = sorted(c for c in directory.iterdir() if c.name.startswith(RANK_DIR_PREFIX) and (c / MODEL_FILE).is_file())
    if not first:
        raise CheckpointError(f"{directory}: no mp_rank_*/{MODEL_FILE} (not a legacy checkpoint)")
    state = load_rank_file(first[0] / MODEL_FILE)
    if "iteration" not in state:
        raise CheckpointError(f"{first[0] / MODEL_FILE}: key 'iteration' missing (not a pretrain checkpoint)")
    return int(state["iteration"])


# ---------------------------------------------------------------------------
# RNG in Megatron-LM's legacy shape


def _restore_rng(entries: Any, where: Path) -> None:
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise CheckpointError(f"{where}: key 'rng_state' is not a list of RNG state dicts")
    _set_rng_state(megatron_lm.rng_state(entries))


# ---------------------------------------------------------------------------
# Save


def _args(cfg: RunConfig, state: TrainState) -> dict:
    """What Megatron-LM keeps in ``args`` that a reader of these files needs, as a plain dict."""
    layout = _layout()
    return {
        **layout,
        "virtual_pipeline_model_parallel_size": cfg.parallel.virtual_pipeline_model_parallel_size,
        "use_distributed_optimizer": cfg.parallel.use_distributed_optimizer,
        "consumed_train_samples": state.consumed_samples,
        "iteration": state.iteration,
        "ckpt_format": "torch",
    }


def _detached(state_dict: dict) -> dict:
    """Tensors copied out of the model's (possibly shared) parameter buffers, so each file holds
    just its own tensors."""
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}


def _writes_a_file() -> bool:
    # Megatron-LM: for every (TP, PP, EP) coordinate the first data-parallel rank of the dense or
    # of the expert layout writes; together they cover every file exactly once.
    return (parallel_state.get_data_parallel_rank() == 0
            or parallel_state.get_expert_data_parallel_rank() == 0)


def save_legacy_checkpoint(cfg: RunConfig, model_chunks, optimizer, scheduler, state: TrainState,
                           root: Optional[str | Path] = None) -> Path:
    """Write ``state.iteration`` under ``root`` (default checkpoint.save) in the legacy layout."""
    if cfg.parallel.use_distributed_optimizer:
        raise CheckpointError(
            "checkpoint.format: torch does not support parallel.use_distributed_optimizer "
            "(its state would need per-rank distrib_optim.pt files); use checkpoint.format: torch_dist"
        )
    root = Path(root or cfg.checkpoint.save)
    final = iteration_dir(root, state.iteration)
    staging = final.with_name(final.name + ".incomplete")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left by a crash during an earlier save
            shutil.rmtree(staging)
        staging.mkdir()
    dist.barrier()

    if _writes_a_file():
        sd: dict = {
            "args": _args(cfg, state),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": state.iteration,
            "consumed_samples": state.consumed_samples,
        }
        for i, chunk in enumerate(model_chunks):
            sd[_model_key(i, len(model_chunks))] = _detached(unwrap(chunk).state_dict_for_save_checkpoint())
        sd["optimizer"] = optimizer.state_dict()
        sd["opt_param_scheduler"] = scheduler.state_dict()
        sd["rng_state"] = megatron_lm.rng_entries(_rng_state())
        sd["run_config"] = to_dict(cfg)
        target = staging / _my_rank_dir() / MODEL_FILE
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        torch.save(sd, tmp)
        tmp.rename(target)
    dist.barrier()

    if rank == 0:
        publish_checkpoint(cfg, staging, final, state.iteration)
        logger.info("saved checkpoint %s (legacy torch format)", final)
    dist.barrier()
    return final


# ---------------------------------------------------------------------------
# Load


def _stored_args(sd: dict, where: Path) -> dict:
    args = sd.get("args")
    if isinstance(args, argparse.Namespace):  # written by Megatron-LM
        args = vars(args)
    if not isinstance(args, dict):
        raise CheckpointError(f"{where}: key 'args' missing; cannot tell the parallel layout it was saved at")
    return args


def _check_optimizer_kind(cfg: RunConfig, where: Path, args: dict, load_optimizer: bool) -> None:
    """A distributed-optimizer checkpoint (Megatron-LM's ``distrib_optim.pt`` beside the rank
    file) loads only into a distributed optimizer, and the other way round."""
    distrib_optim = where.parent / DISTRIB_OPTIM_FILE
    saved = distrib_optim.is_file() or bool(args.get("use_distributed_optimizer"))
    if not load_optimizer or saved == cfg.parallel.use_distributed_optimizer:
        return
    if saved and not distrib_optim.is_file():
        raise CheckpointError(
            f"{distrib_optim}: missing; {where} was saved with the distributed optimizer, whose "
            "parameter state Megatron-LM keeps in this file. Set checkpoint.resume_optimizer=fresh to "
            "resume the weights with a fresh optimizer"
        )
    what = (f"{distrib_optim} holds the distributed optimizer's state" if saved
            else f"{where} was saved without the distributed optimizer")
    raise CheckpointError(
        f"{what}; this run has parallel.use_distributed_optimizer="
        f"{str(cfg.parallel.use_distributed_optimizer).lower()}. Set "
        f"parallel.use_distributed_optimizer={str(saved).lower()} to resume its optimizer state, "
        "or checkpoint.resume_optimizer=fresh to resume the weights with a fresh optimizer"
    )


def load_legacy_checkpoint(cfg: RunConfig, model_chunks, optimizer, scheduler, path: str | Path,
                           load_optimizer: bool = True, load_rng: bool = True) -> TrainState:
    """Restore model (and optimizer, scheduler, RNG) from a legacy checkpoint directory.

    ``path`` is the ``iter_*`` directory (or any directory holding ``mp_rank_*/``). Each rank
    reads its own (TP, PP, EP) file; the layout must be the one the checkpoint was saved at.
    """
    directory = Path(path)
    current = _layout()
    where = directory / _my_rank_dir() / MODEL_FILE
    if not where.is_file():
        found = sorted(c.name for c in directory.iterdir() if c.name.startswith(RANK_DIR_PREFIX))
        raise CheckpointError(
            f"{where}: missing; this run's layout (TP={current['tensor_model_parallel_size']}, "
            f"PP={current['pipeline_model_parallel_size']}, EP={current['expert_model_parallel_size']}) "
            f"needs it, the checkpoint has {found}. Legacy torch checkpoints do not reshard: load at "
            f"the layout they were saved at"
        )
    sd = load_rank_file(where)
    args = _stored_args(sd, where)
    saved = {k: args.get(k) or 1 for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                            "expert_model_parallel_size")}
    wanted = {k: current[k] for k in saved}
    if saved != wanted:
        raise CheckpointError(
            f"{where}: saved at TP={saved['tensor_model_parallel_size']}, "
            f"PP={saved['pipeline_model_parallel_size']}, EP={saved['expert_model_parallel_size']}; "
            f"this run has TP={wanted['tensor_model_parallel_size']}, PP={wanted['pipeline_model_parallel_size']}, "
            f"EP={wanted['expert_model_parallel_size']}. Legacy torch checkpoints do not reshard: load at "
            f"the saved layout (or use checkpoint.format: torch_dist, which reshards)"
        )
    if "iteration" not in sd:
        raise CheckpointError(f"{where}: key 'iteration' missing (not a pretrain checkpoint)")
    _check_optimizer_kind(cfg, where, args, load_optimizer)
    consumed = sd.get("consumed_samples", args.get("consumed_train_samples", 0))
    state = TrainState(iteration=int(sd["iteration"]), consumed_samples=int(consumed))

    for i, chunk in enumerate(model_chunks):
        key = _model_key(i, len(model_chunks))
        if key not in sd:
            raise CheckpointError(
                f"{where}: key {key!r} missing (saved with another number of virtual pipeline stages?)"
            )
        try:
            unwrap(chunk).load_state_dict(sd[key], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{where}: key {key!r} does not fit this model: {str(exc).strip()[:600]}") from None

    has_optimizer = load_optimizer and "optimizer" in sd and "opt_param_scheduler" in sd
    if load_optimizer and not has_optimizer:
        logger.warning("%s holds no optimizer state: starting a fresh optimizer", where)
    distrib_optim = where.parent / DISTRIB_OPTIM_FILE
    if has_optimizer:
        optimizer.load_state_dict(sd["optimizer"])
        if distrib_optim.is_file():  # the parameter state (fp32 masters, Adam moments) lives here
            optimizer.load_parameter_state(str(distrib_optim))
        scheduler.load_state_dict(sd["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()  # main (fp32) params follow the loaded weights

    if load_rng and "rng_state" in sd and args.get("data_parallel_size") == current["data_parallel_size"]:
        _restore_rng(sd["rng_state"], where)
    elif load_rng:
        logger.info("%s: RNG states not restored (saved at another data-parallel size or not saved)", where)
    logger.info("loaded checkpoint %s (legacy torch format, iteration %d, %d samples consumed)",
                directory, state.iteration, state.consumed_samples)
    return state
