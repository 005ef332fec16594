"""Checkpoint merging (PMA) for megatron-core checkpoints.

Python API::

    from megatron_merge import merge_checkpoints, merge_weights, select_checkpoints

    merge_checkpoints(["run/iter_0001000", "run/iter_0002000"], "merged", method="sma")
    merge_checkpoints(select_checkpoints(["run"], last=10, every=2), "merged", method="ema", alpha=0.2)

The command line is ``megatron-merge`` (:mod:`megatron_merge.cli`).
"""

import warnings
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("megatron-pma")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def silence_fallback_warnings() -> None:
    """Hide megatron-core's import-time warnings that Transformer Engine / apex are missing and
    it falls back to torch implementations: noise on every command, on CPUs always (what a
    training run uses is logged by ``pretrain.model`` instead; merging uses neither)."""
    warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                            category=UserWarning)


silence_fallback_warnings()

from megatron_merge.errors import MergeError  # noqa: E402
from megatron_merge.selection import CheckpointRef, select_checkpoints  # noqa: E402
from megatron_merge.weights import METHODS, merge_weights  # noqa: E402


def __getattr__(name):
    # Lazy: importing the package (e.g. for `megatron-merge --help`) should not import torch.
    if name in ("merge_checkpoints", "plan_merge", "MergePlan", "MergeResult"):
        from megatron_merge import offline

        return getattr(offline, name)
    raise AttributeError(f"module 'megatron_merge' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "CheckpointRef",
    "MergeError",
    "merge_checkpoints",
    "merge_weights",
    "plan_merge",
    "select_checkpoints",
    "__version__",
]
