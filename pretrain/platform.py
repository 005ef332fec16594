"""Process groups and device placement: NCCL on GPUs, gloo on CPUs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a
plain ``python -m pretrain`` runs as a world of one. On CPUs the CUDA
compatibility layer (:mod:`pretrain.cpu_compat`) is installed before
megatron-core builds anything.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from pretrain import cpu_compat
from pretrain.config import RunConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Platform:
    """Where this process runs."""

    device: torch.device
    backend: str  # "nccl" or "gloo"
    rank: int
    world_size: int
    local_rank: int

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


def select_device(cfg: RunConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where small tensors for collectives (loss sums, flags, metrics) must live: NCCL takes
    CUDA tensors only; on CPUs gloo (and cpu_compat's CUDA calls) use the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def free_port() -> int:
    """A TCP port free on this host now (for a single-node rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig) -> Platform:
    """Start torch.distributed (if not yet) and megatron-core's parallel state for ``cfg``."""
    from megatron.core import parallel_state

    device = select_device(cfg)
    if device.type == "cpu":
        cpu_compat.enable()
        # Leave one core per process: 2 ranks on 2 cores must not oversubscribe.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    else:
        torch.cuda.set_device(device)

    backend = "gloo" if device.type == "cpu" else "nccl"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
            distributed_timeout_minutes=p.distributed_timeout_minutes,
        )
    return Platform(
        device=device,
        backend=backend,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def shutdown() -> None:
    """Tear down megatron-core's groups and every torch.distributed process group (idempotent)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # never import it just to tear down
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()  # all groups, including those made by other libraries (DeepSpeed)


def _exit_on_sigterm(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def process_group_teardown() -> Iterator[None]:
    """Destroy every process group when the block ends, however it ends.

    Use it around (or as a decorator of) any code that creates a process group: training,
    evaluation, spawned test and benchmark workers. It runs the teardown on return, on an
    exception, and on SIGTERM (what torchrun and ``mp.spawn`` send to the surviving workers
    when one fails), which it turns into ``SystemExit(143)``; SIGINT already unwinds as
    ``KeyboardInterrupt``. A gloo group still alive at interpreter exit has worker threads
    holding Python objects, and finalization then aborts the process now and then with
    ``terminate called without an active exception`` after all its work is done.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live there only
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        try:
            shutdown()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401  (a partly installed TE must not select the TE spec)
    except Exception:
        return False
    return True
