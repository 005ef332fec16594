"""megatron-core's ``dist_checkpointing.load`` with every pickled part read by :mod:`.safe_load`.

megatron-core's torch_dist load path unpickles three things unsafely: ``.metadata`` (torch's
``FileSystemReader.read_metadata``: plain ``pickle.load``), bytes items such as RNG state and
``_extra_state`` (DCP's ``DefaultLoadPlanner.load_bytes``: ``torch.load(weights_only=False)``)
and ``common.pt`` (``torch.load`` with the process-wide allowlist, errors naming no file). The
strategies here are megatron-core's own, given our reader and planner -- nothing in
site-packages is patched:

:class:`SafeTorchDistLoadStrategy`  ``TorchDistLoadShardedStrategy`` reading through
    :class:`~megatron_merge.safe_load.SafeFileSystemReader` and :class:`SafeLoadPlanner`; every
    bytes item the load asks for is parsed before the model is touched, so a refused item
    leaves the model as it was.
:class:`SafeCommonLoadStrategy`     ``TorchCommonLoadStrategy`` reading ``common.pt`` with
    :func:`~megatron_merge.safe_load.load_torch`.

:func:`load` and :func:`load_common_state_dict` are the drop-in replacements callers use;
:func:`merge_error_in` finds the safe reader's refusal behind a failed load.
"""

from __future__ import annotations

import io
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    TorchDistLoadShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

from megatron_merge.errors import MergeError
from megatron_merge.safe_load import SafeFileSystemReader, load_torch, read_bytes_item, read_dcp_metadata


class SafeLoadPlanner(MCoreLoadPlanner):
    """megatron-core's load planner, unpickling bytes items with :func:`load_torch`."""

    def __init__(self, checkpoint_dir: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = Path(checkpoint_dir)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        info = self.metadata.storage_data[read_item.storage_index]
        obj = load_torch(value, where=self.checkpoint_dir / info.relative_path, key=fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy with the safe reader and planner.

    :meth:`load` follows ``TorchDistLoadShardedStrategy.load`` step for step (megatron-core's own
    helpers convert the state dict), only the reader and planner are ours.
    """

    def load(self, sharded_state_dict, checkpoint_dir: Path):
        checkpoint_dir = Path(checkpoint_dir)
        flexible_shape = [
            t for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch
        ]
        allow_shape_mismatch = {
            t.key: t for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and t.allow_shape_mismatch
        }
        original = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict
        )
        reader = SafeFileSystemReader(checkpoint_dir)
        metadata = reader.read_metadata()  # refused here, before DCP starts
        # Objects are parsed before anything touches the model: converting the state dict
        # already zeroes the allow_shape_mismatch tensors (the padded embedding) in place.
        for key, values in sharded_state_dict.items():
            if isinstance(values[0], ShardedObject) and MetadataIndex(key) in metadata.storage_data:
                read_bytes_item(checkpoint_dir, metadata, key)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, True)
        checkpoint.load_state_dict(
            pyt_state_dict, reader,
            planner=SafeLoadPlanner(
                checkpoint_dir,
                shapes_validation_sharded_tensors=flexible_shape,
                allow_shape_mismatch_sharded_tensors=allow_shape_mismatch,
            ),
        )
        self.cached_global_metadata = metadata
        state = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        state = _replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        _restore_dict_types(state, original)
        return state

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Metadata = None):
        if metadata is None:
            metadata = read_dcp_metadata(checkpoint_dir)
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path):

        metadata = read_dcp_metadata(checkpoint_dir)
        sharded = {}
        for key, meta in metadata.state_dict_metadata.items():
            if isinstance(meta, BytesStorageMetadata):
                obj = ShardedObject.empty_from_unique_key(key)
                sharded[obj.unique_key] = obj
        sharded.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return sharded


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """megatron-core's common-state strategy reading ``common.pt`` with :func:`load_torch`."""

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        common = load_torch(path)
        if not isinstance(common, dict):
            raise MergeError(f"{path}: holds {type(common).__name__}, expected a dict")
        return common

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        # torch_dist keeps objects in its .distcp files (SafeTorchDistLoadStrategy reads them);
        # the per-object files of other backends are not read here.
        raise MergeError(f"{checkpoint_dir}: objects stored outside the torch_dist files are not supported")


def load(sharded_state_dict, checkpoint_dir: str | Path, **kwargs):
    """``megatron.core.dist_checkpointing.load`` through the safe strategies (same arguments)."""
    return dist_checkpointing.load(
        sharded_state_dict, str(checkpoint_dir),
        sharded_strategy=SafeTorchDistLoadStrategy(), common_strategy=SafeCommonLoadStrategy(), **kwargs,
    )


def load_common_state_dict(checkpoint_dir: str | Path) -> dict:
    """``common.pt`` of a torch_dist checkpoint, read safely (a dict, or :class:`MergeError`)."""
    return SafeCommonLoadStrategy().load_common(checkpoint_dir)


def merge_error_in(exc: BaseException) -> MergeError | None:
    """The safe reader's error behind a failed load: ``exc`` itself, or the first MergeError a
    rank raised inside DCP's CheckpointException (which wraps per-rank errors); else None."""
    if isinstance(exc, MergeError):
        return exc
    if isinstance(exc, CheckpointException):
        for failure in exc.failures.values():
            failure = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(failure, MergeError):
                return failure
    return None
