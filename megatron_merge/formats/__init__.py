"""Checkpoint formats the merger reads and writes.

Each format only lists a checkpoint's pieces and reads/writes them; the arithmetic lives in
:mod:`megatron_merge.accumulate`. Formats:

``torch_dist``  megatron-core distributed checkpoints (PyTorch DCP): merged chunk by chunk,
                inputs may differ in layout (:mod:`.torch_dist`).
``torch``       legacy Megatron ``mp_rank_*/model_optim_rng.pt``: merged file by file
                (:mod:`.legacy`).
``deepspeed``   DeepSpeed tag directories (``*_model_states.pt``, ZeRO ``*_optim_states.pt``):
                merged file by file (:mod:`.deepspeed`).

The per-rank-file formats share :mod:`.rank_files`. What every format provides to the merge
engine (:mod:`megatron_merge.offline`) is the small contract in :mod:`.base`; the engine finds
a format's implementation with :func:`format_module`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from megatron_merge.errors import MergeError
from megatron_merge.formats.base import gc_paused
from megatron_merge.formats.dcp import TorchDistCheckpoint

FORMATS = ("torch_dist", "torch", "deepspeed")
# The module implementing each format's part of the merge (``plan_format``, ``item_writer``).
_MERGE_MODULES = {
    "torch_dist": "megatron_merge.formats.torch_dist",
    "torch": "megatron_merge.formats.rank_files",
    "deepspeed": "megatron_merge.formats.rank_files",
}


def is_extra_state(key: str) -> bool:
    """Whether a state-dict key names a module's ``_extra_state`` (Transformer Engine's FP8
    metadata and the like): copied from the newest input even when it is a float tensor."""
    return key.split("/shard_", 1)[0].endswith("_extra_state")


def detect_format(path: str | Path) -> str | None:
    """The format of a checkpoint directory, from its contents; None if it is none of them."""
    from megatron_merge.formats.deepspeed import looks_like_deepspeed
    from megatron_merge.formats.legacy import is_legacy_checkpoint

    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "metadata.json").exists():
        return "torch_dist"
    if is_legacy_checkpoint(path):
        return "torch"
    if looks_like_deepspeed(path) or (path / "latest").is_file():
        return "deepspeed"
    return None


def open_checkpoint(path: str | Path, format: str | None = None):
    """Open a checkpoint directory in ``format`` (default: detected from its contents).

    A directory of no known format is opened as ``torch_dist``, whose error names what is missing.
    """
    fmt = format or detect_format(path) or "torch_dist"
    if fmt == "torch_dist":
        return TorchDistCheckpoint(path)
    if fmt == "torch":
        from megatron_merge.formats.legacy import LegacyCheckpoint

        return LegacyCheckpoint(path)
    if fmt == "deepspeed":
        from megatron_merge.formats.deepspeed import DeepSpeedCheckpoint

        return DeepSpeedCheckpoint(path)
    raise MergeError(f"unknown checkpoint format {format!r}; one of {', '.join(FORMATS)}")


def input_format(paths, format: str | None = None) -> str:
    """The one format of all inputs (``format`` if given); raise if they differ."""
    if format is not None:
        if format not in FORMATS:
            raise MergeError(f"unknown checkpoint format {format!r}; one of {', '.join(FORMATS)}")
        return format
    paths = [Path(p) for p in paths]
    found = [detect_format(p) for p in paths]
    newest = found[-1] or "torch_dist"
    for path, fmt in zip(paths, found):
        # An unrecognised directory is left to the newest input's format to refuse by name.
        if fmt is not None and fmt != newest:
            raise MergeError(
                f"{path}: a {fmt} checkpoint, but the newest input {paths[-1]} is {newest}; "
                f"all inputs must have one format"
            )
    return newest


def format_module(format: str) -> ModuleType:
    """The module that plans and writes merges of ``format`` (see :mod:`.base`)."""
    if format not in _MERGE_MODULES:
        raise MergeError(f"unknown checkpoint format {format!r}; one of {', '.join(FORMATS)}")
    return importlib.import_module(_MERGE_MODULES[format])


def item_writer(settings, checkpoints: list | None = None):
    """The writer of work items for the merge described by ``settings`` (a
    :class:`~.base.MergeSettings`), in this process; opens the inputs unless given."""
    if checkpoints is None:
        with gc_paused():  # metadata of every input: many small objects (see gc_paused)
            checkpoints = [open_checkpoint(path, settings.format) for path in settings.input_paths]
    return format_module(settings.format).item_writer(settings, checkpoints)
