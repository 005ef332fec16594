"""Checkpoint merging (PMA) for megatron-core checkpoints.

Python API::

    from megatron_merge import merge_checkpoints, merge_weights, select_checkpoints

    merge_checkpoints(["run/iter_0001000", "run/iter_0002000"], "merged", method="sma")
    merge_checkpoints(select_checkpoints(["run"], last=10, every=2), "merged", method="ema", alpha=0.2)

The command line is ``megatron-merge`` (:mod:`megatron_merge.cli`).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("megatron-pma")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from megatron_merge.errors import MergeError
from megatron_merge.selection import CheckpointRef, select_checkpoints
from megatron_merge.weights import METHODS, merge_weights


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
