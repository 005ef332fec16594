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

MoE-specific gaps (``te_general_gemm`` without Transformer Engine, token
dispatch collectives on gloo) are patched in :func:`_patch_moe`.

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


def _patch_moe() -> None:
    """Placeholder for MoE-specific redirections (see the MoE module docs)."""


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
