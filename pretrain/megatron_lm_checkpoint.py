"""What a ``torch_dist`` checkpoint written by Megatron-LM's own training code stores where
``pretrain``'s stores it differently, so that ``pretrain`` resumes a Megatron-LM run exactly.

Megatron-LM (``megatron.training.checkpointing``) keeps in ``common.pt``:

* ``args``, its ``argparse.Namespace``: ``consumed_train_samples`` (where the data stands;
  ``pretrain`` writes ``consumed_samples``), the parallel sizes, ``use_distributed_optimizer``;
* ``content_metadata['distrib_optim_sharding_type']``: the distributed optimizer's layout
  (``dp_reshardable`` by default), which the optimizer's sharded state dict must name to load;
* ``opt_param_scheduler`` with its steps counted in samples (``pretrain`` counts iterations; the
  loop re-aligns the scheduler to the iteration after loading).

Its RNG state is one ``ShardedObject('rng_state')`` per (PP, TP) rank (per (PP, TP, DP) rank
when EP > 1), a one-element list of a dict keyed ``random_rng_state``, ``np_rng_state``,
``torch_rng_state``, ``cuda_rng_state``, ``rng_tracker_states``.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

LAYOUT_ARGS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "data_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
)


def megatron_lm_args(common: dict) -> Optional[dict]:
    """Megatron-LM's ``args`` of a checkpoint's common state as a dict; None if not Megatron-LM's."""
    args = common.get("args")
    if args is None or isinstance(args, dict) or not hasattr(args, "__dict__"):
        return None
    return dict(vars(args))


def consumed_samples(args: dict) -> int:
    return int(args.get("consumed_train_samples") or 0)


def saved_layout(args: dict) -> dict:
    """The parallel layout a Megatron-LM run saved at, in ``pretrain``'s ``parallel_layout`` form."""
    layout = {key: int(args.get(key) or 1) for key in LAYOUT_ARGS}
    if args.get("expert_tensor_parallel_size") is None:  # Megatron-LM: defaults to TP
        layout["expert_tensor_parallel_size"] = layout["tensor_model_parallel_size"]
    return layout


def optimizer_sharding(common: dict) -> Optional[str]:
    """The distributed optimizer's saved layout (``dp_reshardable``, ``fully_reshardable``, ...)."""
    return (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")


def rng_sharded_object(data: Any = None) -> ShardedObject:
    """Megatron-LM's RNG ``ShardedObject`` for this rank (``get_rng_state``'s shape and offset)."""
    pp = (parallel_state.get_pipeline_model_parallel_world_size(),
          parallel_state.get_pipeline_model_parallel_rank())
    tp = (parallel_state.get_tensor_model_parallel_world_size(),
          parallel_state.get_tensor_model_parallel_rank())
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        return ShardedObject("rng_state", data, (pp[0], tp[0], dp_size), (pp[1], tp[1], dp_rank),
                             replica_id=0)
    return ShardedObject("rng_state", data, (pp[0], tp[0]), (pp[1], tp[1]), replica_id=dp_rank)


# pretrain's RNG state key -> Megatron-LM's name for it in a stored RNG entry.
_RNG_NAMES = {"random": "random_rng_state", "np_random": "np_rng_state", "torch": "torch_rng_state",
              "tracker": "rng_tracker_states", "cuda": "cuda_rng_state"}
_OPTIONAL_RNG = {"cuda"}  # saved only where CUDA is


def rng_state(entries: Any) -> dict:
    """Megatron-LM's stored RNG entry list -> ``pretrain``'s RNG state dict."""
    entry = entries[0]
    return {ours: entry[theirs] for ours, theirs in _RNG_NAMES.items()
            if ours not in _OPTIONAL_RNG or theirs in entry}


def rng_entries(state: dict) -> list[dict]:
    """``pretrain``'s RNG state dict -> Megatron-LM's RNG entry list (the inverse of :func:`rng_state`)."""
    return [{theirs: state[ours] for ours, theirs in _RNG_NAMES.items()
             if ours not in _OPTIONAL_RNG or ours in state}]
