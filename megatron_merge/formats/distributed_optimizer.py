"""megatron-core's distributed optimizer in ``torch_dist`` checkpoints: where its fp32 masters are.

megatron-core saves the distributed optimizer's state in one of these layouts
(``distrib_optim_sharding_type`` in ``common.pt``'s content metadata):

``fully_reshardable``  model space: ``optimizer.state.param.<model key>`` (the fp32 master),
                       ``optimizer.state.exp_avg.<model key>``, ... shaped like the weight.
                       Merged like the weights, under any parallel layout.
``dp_reshardable``     bucket space (Megatron-LM's default with ``--use-distributed-optimizer``):
                       ``optimizer.distributed.dp_group_idx_G.gbuf_idx_B.dtype_D.bucket_idx_K.param``
                       (and ``.exp_avg``, ``.exp_avg_sq``): one flat fp32 tensor per gradient
                       bucket, the bucket's parameters back to back, each starting at a multiple
                       of 64 elements (``_ParamAndGradBuffer._pad_start_of_param_if_needed``),
                       the gaps filled with uninitialised memory (``torch.empty`` in
                       ``DistributedOptimizer.sharded_param_state_dp_reshardable``). Each data-
                       parallel rank stores its contiguous shard of the bucket, one chunk per
                       parameter piece and one per gap.

A bucket element is the same parameter element in two checkpoints only when both were saved with
the same bucket layout (model, data-parallel size, bucket size): the merge checks that the inputs
store the same chunks and merges the parameter chunks element by element; gap chunks are copied
from the newest input, never read as numbers.
"""

from __future__ import annotations

import re

from megatron_merge.errors import MergeError

# The fp32 master weights of a dp_reshardable bucket (its Adam moments are other suffixes).
BUCKET_MASTER_KEY = re.compile(
    r"^optimizer\.distributed\.dp_group_idx_\d+\.gbuf_idx_\d+\.dtype_.+\.bucket_idx_\d+\.param$"
)
# megatron-core aligns every parameter's start in a distributed-optimizer bucket to this many
# elements (128 bytes of 16-bit values).
PARAM_ALIGNMENT = 64
# torch DCP file names: __{rank}_{writer thread}.distcp
_DISTCP_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def is_bucket_master_key(key: str) -> bool:
    """Whether ``key`` holds fp32 master weights in the dp_reshardable bucket layout."""
    return BUCKET_MASTER_KEY.match(key) is not None


def bucket_gap_chunks(ckpt, key: str) -> set[tuple[int, ...]]:
    """Offsets of the chunks of bucket tensor ``key`` that are gaps between parameters.

    A chunk holds (a piece of) a parameter when it starts at a multiple of
    :data:`PARAM_ALIGNMENT`, or when it starts a data-parallel rank's shard and continues the
    parameter the previous shard ended with. Every other chunk starts where a parameter ended:
    a gap. A shard starts at the lowest offset its rank wrote (the rank is in the file name).
    """
    chunks = sorted(ckpt.chunks(key), key=lambda c: c.offsets)
    shard_starts: dict[int, int] = {}
    for chunk in chunks:
        match = _DISTCP_FILE.match(chunk.storage.relative_path)
        if match is None:
            raise MergeError(
                f"{ckpt.path / chunk.storage.relative_path}: key {key!r}: file name is not "
                f"__<rank>_<n>.distcp, so the distributed optimizer's shards cannot be told apart"
            )
        rank = int(match.group(1))
        shard_starts[rank] = min(shard_starts.get(rank, chunk.offsets[0]), chunk.offsets[0])
    starts = set(shard_starts.values())
    gaps: set[tuple[int, ...]] = set()
    previous_is_gap = False
    for chunk in chunks:
        start = chunk.offsets[0]
        if start % PARAM_ALIGNMENT == 0:
            is_gap = False
        elif start in starts:
            is_gap = previous_is_gap  # a gap or a parameter crossing into this shard
        else:
            is_gap = True
        if is_gap:
            gaps.add(chunk.offsets)
        previous_is_gap = is_gap
    return gaps


def check_same_bucket_layout(ckpt, newest, key: str) -> None:
    """Raise unless ``ckpt`` stores bucket tensor ``key`` in exactly ``newest``'s chunks."""
    mine = sorted((c.offsets, c.sizes) for c in ckpt.chunks(key))
    theirs = sorted((c.offsets, c.sizes) for c in newest.chunks(key))
    if mine != theirs:
        raise MergeError(
            f"{ckpt.path}: key {key!r}: the distributed optimizer's bucket layout differs from "
            f"the newest input {newest.path} ({len(mine)} vs {len(theirs)} stored pieces: saved "
            f"with another data-parallel size, bucket size or model), so its fp32 master weights "
            f"cannot be matched element by element; merge with --model-only, or save the runs "
            f"with --dist-ckpt-optim-fully-reshardable (model-space optimizer state)"
        )
