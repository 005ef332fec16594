"""Run megatron-core on machines without CUDA.

megatron-core assumes CUDA throughout: it allocates with ``device='cuda'`` or
``device=torch.cuda.current_device()``, moves tensors with ``.cuda()``, creates
streams and events, asserts ``param.type() == 'torch.cuda.FloatTensor'`` in the
gradient clipper and the mixed-precision / distributed optimizers, and keeps
its tensor-parallel RNG in the CUDA generator.

:func:`enable` installs, once and only when ``torch.cuda.is_available()`` is
False, a small set of redirections so that the *same* megatron-core code paths
(GPTModel, DDP, the optimizers, schedules, dist_checkpointing) run on the CPU
with gloo:

* a :class:`torch.overrides.TorchFunctionMode` that rewrites CUDA device
  arguments (``'cuda'``, ``'cuda:N'``, ``torch.device('cuda')``, bare ints) to
  the CPU, makes ``Tensor.cuda()`` a no-op, and reports CPU tensors'
  ``Tensor.type()`` under their CUDA names so megatron-core's type assertions
  accept them (the only place those names are compared);
* stand-ins for ``torch.cuda`` runtime calls: device queries, synchronize,
  streams, events, NVTX ranges and memory statistics;
* the CUDA RNG API mapped onto the CPU default generator, which is where CPU
  dropout and initialisation draw from, so megatron-core's RNG tracker forks
  and restores the generator CPU kernels actually use.

MoE-specific gaps (``te_general_gemm`` without Transformer Engine, the token
dispatchers' host-side split sizes, uneven all-gather / reduce-scatter on gloo)
are patched in :func:`_patch_moe`.

Nothing here changes numerics: every redirected call does on the CPU what the
original does on a GPU. On a CUDA machine :func:`enable` does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ENABLED = False
_MODE: "CudaToCpuMode | None" = None

# CPU tensor type names and the CUDA names megatron-core compares them against.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def is_active() -> bool:
    """True when the CPU compatibility layer is installed in this process."""
    return _ENABLED


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device index means an accelerator index in torch.
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_device(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(device) else device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """A CUDA stream stand-in: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        self.device = torch.device("cpu")

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def query(self):
        return True


class _NullEvent:
    """A CUDA event stand-in; elapsed_time is measured on the host clock."""

    def __init__(self, *args, enable_timing: bool = False, **kwargs):
        self._time = None

    def record(self, stream=None):
        import time

        self._time = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_NullEvent") -> float:
        return (end._time - self._time) * 1000.0


@contextlib.contextmanager
def _null_stream_context(stream=None):
    yield


class _NullNvtx:
    @staticmethod
    def range_push(msg):
        return 0

    @staticmethod
    def range_pop():
        return 0

    @staticmethod
    @contextlib.contextmanager
    def range(msg, *args, **kwargs):
        yield

    @staticmethod
    def mark(msg):
        pass


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0  # mapped to the CPU by CudaToCpuMode
    cuda.set_device = lambda device: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.ExternalStream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = _null_stream_context
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.set_stream = lambda stream: None
    cuda.nvtx = _NullNvtx
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.memory_stats = lambda device=None: {}
    cuda.reset_peak_memory_stats = lambda device=None: None
    # The CUDA RNG becomes the CPU default generator, the one CPU kernels use.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # (torch.manual_seed itself calls cuda.manual_seed_all, which stays a lazy no-op.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron_rng() -> None:
    """megatron-core reads and writes the CUDA generator through private helpers."""
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state


def _patch_distributed_optimizer_step_state() -> None:
    """Let the distributed optimizer load Adam state when torch's Adam keeps a ``step`` tensor.

    Without TE or apex (always the case on CPUs) megatron-core falls back to
    torch Adam, whose per-parameter state holds ``step``. Loading
    ``fully_reshardable`` state restores ``step`` from the param groups but then
    copies every state key from the checkpoint tensors, which skip ``step`` on
    purpose, and fails with KeyError. Supplying the already-restored ``step``
    for that key makes the copy a no-op. The restored ``step`` is also one
    tensor shared by all parameters, which torch Adam would then advance once
    per parameter per step; each parameter gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 and "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                # megatron-core hands every parameter the same step tensor; torch
                # Adam increments each parameter's step in place, so give each its own.
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


# ---------------------------------------------------------------------------
# Mixture of Experts (megatron-core transformer/moe) on CPUs with gloo.


def ensure_router_gemm_fallback() -> None:
    """Let megatron-core's MoE router run without Transformer Engine.

    ``moe_utils`` binds ``te_general_gemm`` only inside its ``try: import
    transformer_engine`` block, yet ``RouterGatingLinearFunction`` tests
    ``te_general_gemm is not None`` unconditionally, so without TE every MoE
    forward raises NameError. Binding the name to None selects the
    ``torch.mm`` / ``torch.addmm`` branch megatron-core has for exactly this
    case (logits = x W^T (+ b) in the router dtype, forward and backward).
    Not specific to CPUs: a GPU without TE needs it too, so the model builder
    calls this for MoE models; where TE is importable it does nothing.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _split_sizes_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron-core's ``maybe_move_tensor_to_cpu`` when every tensor already lives on the CPU.

    The all-to-all token dispatcher counts tokens per expert on the device and
    moves the counts to the host with ``maybe_move_tensor_to_cpu(...,
    as_numpy=True)``; the numpy arrays are the split sizes it hands to
    ``all_to_all_single``. The original acts only on CUDA tensors, so on the CPU
    the splits stay tensors and the collective's binding rejects them
    (TypeError: incompatible function arguments). Here CPU tensors get the same
    treatment CUDA tensors get: a host copy, as numpy when asked.
    """
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().clone().numpy()
    return tensor


def all_gather_uneven(input_: torch.Tensor, group, output_split_sizes) -> torch.Tensor:
    """All-gather along dim 0 where rank i contributes ``output_split_sizes[i]`` rows.

    gloo's ``all_gather`` needs equal tensors ("ProcessGroupGloo::allgather:
    invalid tensor size"), which megatron-core's list-based uneven gather
    assumes NCCL provides. Each rank pads its rows to the largest split, one
    ``all_gather_into_tensor`` moves them, and the padding is dropped: the
    result is the concatenation of every rank's rows, bit for bit.
    """
    sizes = [int(n) for n in output_split_sizes]
    rank, world = group.rank(), group.size()
    if input_.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {input_.shape[0]} rows, output_split_sizes says {sizes[rank]}")
    width = max(sizes)
    padded = input_.new_zeros((width, *input_.shape[1:]))
    padded[: sizes[rank]] = input_
    gathered = input_.new_empty((world * width, *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
    return torch.cat([gathered[i * width : i * width + n] for i, n in enumerate(sizes)])


def reduce_scatter_uneven(input_: torch.Tensor, group, input_split_sizes) -> torch.Tensor:
    """Reduce-scatter along dim 0: rank i receives the sum over ranks of chunk i (``input_split_sizes[i]`` rows).

    gloo's list-based ``reduce_scatter`` is recent (PyTorch 2025, itself one
    all-reduce per chunk) and missing from older releases the project allows
    (torch >= 2.6). All-reducing the whole input and keeping this rank's chunk
    computes the same sums with a collective every gloo has.
    """
    sizes = [int(n) for n in input_split_sizes]
    rank = group.rank()
    if input_.shape[0] != sum(sizes):
        raise ValueError(f"input has {input_.shape[0]} rows, input_split_sizes sum to {sum(sizes)}")
    total = input_.contiguous().clone()
    torch.distributed.all_reduce(total, group=group)
    start = sum(sizes[:rank])
    return total[start : start + sizes[rank]].contiguous()


def _patch_uneven_first_dim_collectives() -> None:
    """Route megatron-core's uneven sequence-parallel gather / reduce-scatter through the gloo versions above.

    The all-to-all dispatcher with expert tensor parallelism gathers (and in the
    backward reduce-scatters) a different number of tokens per expert-TP rank,
    passing ``output_split_sizes`` / ``input_split_sizes``; the equal-split
    calls (None) keep megatron-core's own code, which gloo supports.
    """
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    @functools.wraps(gather)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is not None and group.size() > 1:
            return all_gather_uneven(input_, group, output_split_sizes)
        return gather(input_, group, output_split_sizes, use_global_buffer)

    @functools.wraps(reduce_scatter)
    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is not None and group.size() > 1:
            return reduce_scatter_uneven(input_, group, input_split_sizes)
        return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _patch_moe() -> None:
    """MoE layers and both token dispatchers (alltoall, allgather) on CPUs with gloo.

    Everything else the MoE path needs already works through the general
    redirections: the dispatcher's device-to-host stream and event become the
    null stream/event, the router's ``.to(torch.cuda.current_device())`` and
    global-buffer allocations land on the CPU, and gloo has the even
    ``all_gather_into_tensor``, ``reduce_scatter_tensor`` and uneven
    ``all_to_all_single`` the dispatchers use.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    ensure_router_gemm_fallback()
    # token_dispatcher imported the function by name: replace both bindings.
    moe_utils.maybe_move_tensor_to_cpu = _split_sizes_to_host
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_host
    _patch_uneven_first_dim_collectives()


def enable() -> bool:
    """Install the CPU compatibility layer if CUDA is absent; returns whether it is active.

    Safe to call more than once. Must run before megatron-core builds models.
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_distributed_optimizer_step_state()
    _patch_moe()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    logger.info("CUDA not available: megatron-core runs on the CPU through pretrain.cpu_compat")
    return True
