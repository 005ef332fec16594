"""Checkpoint formats the merger reads and writes.

Each format only lists a checkpoint's pieces and reads/writes them; the arithmetic lives in
:mod:`megatron_merge.accumulate`. Supported now: megatron-core ``torch_dist`` (PyTorch DCP).
Planned: legacy Megatron ``torch`` (``mp_rank_*`` directories) and DeepSpeed ZeRO files.
"""

from __future__ import annotations

from pathlib import Path

from megatron_merge.errors import MergeError
from megatron_merge.formats.torch_dist import TorchDistCheckpoint


def open_checkpoint(path: str | Path) -> TorchDistCheckpoint:
    """Open a checkpoint directory, naming the format when it is one we cannot merge yet."""
    path = Path(path)
    if path.is_dir() and not (path / "metadata.json").exists():
        if any(child.name.startswith("mp_rank_") for child in path.iterdir()):
            raise MergeError(
                f"{path}: legacy Megatron 'torch' checkpoint (mp_rank_* directories); "
                f"only torch_dist checkpoints can be merged so far"
            )
        if (path / "latest").exists() or any(path.glob("*zero_pp_rank_*")):
            raise MergeError(
                f"{path}: DeepSpeed checkpoint; only torch_dist checkpoints can be merged so far"
            )
    return TorchDistCheckpoint(path)
