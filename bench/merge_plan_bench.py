"""Distributed merge plan at 70B / 100B+ scale: balance over ranks, and planning time (a benchmark).

    python bench/merge_plan_bench.py            # everything: balance, plan check, 10^3 .. 10^6 chunks
    python bench/merge_plan_bench.py --quick    # under ~2 minutes: balance, 10^3 .. 10^5 chunks
    python bench/merge_plan_bench.py --profile 100000 --families stacked  # cProfile of plan_merge
    python bench/merge_plan_bench.py --skip-balance --sizes 1000 10000 --families per-key

Prints one JSON line per measurement (``{"bench": "balance" | "plan_check" | "plan_time", ...}``)
and then readable tables. Nothing is measured on real tensors: the checkpoints are synthetic,
laid out exactly as megatron-core's ``torch_dist`` save lays them out, with sparse ``.distcp``
files (``os.truncate``), so a 70B checkpoint costs a few MB of disk.

**(a) Balance** (``"bench": "balance"``). For each model and training layout, the ``.distcp``
files a megatron-core ``torch_dist`` save writes, computed from the layout:

* models: Llama-3-70B (80 layers, hidden 8192, 64 heads, GQA 8 KV heads of 128, SwiGLU ffn
  28672, vocab 128256 padded to a multiple of 128 x TP, untied output layer; 70.6B parameters)
  and gpt-oss-120b (OpenAI's published 116.8B MoE: 36 layers, hidden 2880, 64 heads of 64, 8 KV
  heads, 128 experts with SwiGLU ffn 2880, attention and expert biases, attention sinks,
  vocab 201088);
* keys as megatron-core names them, layers (and experts) stacked into one key by a prepended
  axis (``decoder.layers.mlp.linear_fc1.weight`` is ``[80, 57344, 8192]``, one chunk per layer
  per TP rank, two for SwiGLU's fc1), bf16 weights, and the distributed optimizer's state in its
  ``fully_sharded_model_space`` layout (what Megatron-LM saves with ``--ckpt-fully-parallel-save``
  and ``--use-distributed-optimizer``): ``optimizer.state.fp32_param.<key>``, ``.exp_avg.``,
  ``.exp_avg_sq.``, fp32, one chunk per piece of a parameter a data-parallel rank owns. The
  pieces come from megatron-core's bucket layout (parameters in reverse order, each start
  padded to 64 elements, buckets of ``max(4e7, 1e6 x DP)`` elements padded to ``lcm(DP, 128)``,
  each bucket split evenly over the DP ranks; MoE experts in their own buffer over the expert-
  data-parallel ranks; MoE keys carry the chained optimizer's ``chained_0.`` / ``chained_1.``);
* who writes what: the fully parallel save's own assignment
  (``megatron.core.dist_checkpointing.exchange_utils.distribute_shards_to_ranks``, called here,
  with its sizes: ``_shard_size`` counts an optimizer piece as its parameter's whole local
  shape, which leaves the dense layouts' files unequal: the largest 1.8-2.2x the mean),
  each rank's items split over 2 writer threads by megatron-core's own
  ``filesystem_async._split_by_size_and_type`` -> ``__{rank}_{0,1}.distcp``; bytes items are the
  per-rank RNG state (``rng_state/shard_pp.tp.dp_PP.TP.DP``) and Transformer Engine
  ``_extra_state`` per layer (and expert) and module, real ``torch.save`` payloads; item lengths
  are ``numel x itemsize`` plus torch.save's header (measured); ``common.pt`` is small and
  written by one rank, so it is not a work item.

Each output file is one work item, written whole by one rank, so a merge over R ranks is
balanced at best to ``max(largest file, total / R) / (total / R)`` (``bound``). Reported at
R = 8, 64, 512: ``balance`` = max / mean bytes per rank of ``megatron_merge.ranks.assign_by_bytes``
(1.00 is perfect; ranks without work count in the mean), the items per rank (min / mean / max)
and ``idle`` ranks (no item: happens when R > files). Each layout's line (``"bench": "layout"``)
also gives its chunk count, the most chunks one key has, and ``overlap_tests``: the box
intersections a scan of every stored chunk per query would compute (see :func:`overlap_tests`),
quadratic in the chunks of a key. The planner did that scan until its per-key chunk index
(``formats/dcp.py``, ``_ChunkIndex``); the column shows what the index saves.

**Plan check** (``"bench": "plan_check"``, not with ``--quick``): one layout written to disk as
two synthetic inputs and planned by the real ``megatron_merge.offline.plan_merge``; the plan's
per-file bytes must equal the sizes computed from the layout (``equal: true``), and its time is
reported. With ``--quick`` the planner is not run on a full-size layout (see (b) for why).

**(b) Planning time** (``"bench": "plan_time"``): ``plan_merge([a, b], "sma")`` on synthetic
checkpoints of N = 10^3 .. 10^6 chunks (the real planner: it reads ``.metadata`` through the
project's restricted unpickler, checks ``common.pt``, the bytes items and every file, and plans
every chunk), each in a fresh subprocess: wall and CPU seconds (on a shared host CPU time is
the steadier figure), CPU microseconds per chunk (flat = linear), ``growth`` = the local
exponent d log(CPU time) / d log(chunks) from the previous size (1 = linear, 2 = quadratic),
peak RSS of that process (``VmHWM``; ~270 MiB of it is the interpreter with torch) and the
``.metadata`` size. Each parameter is 4 keys (bf16 weight, fp32_param, exp_avg, exp_avg_sq;
half the chunks merged, half copied), over ``N // 2000`` ranks (at least 4, at most 512) x 2
files. Two families:

``per-key``   8 chunks per key, the key count grows with N (like a TP=8 layout with unstacked layers);
``stacked``   64 parameters (256 keys), the chunks per key grow with N: megatron-core's layout,
              where every layer's (and every DP piece's) chunk of a parameter is one key.

A size whose time, extrapolated from the previous size's growth, would pass ``--time-budget``
seconds is skipped and reported with that projection (a lower bound when the growth is still
rising) and its ``overlap_tests`` (what a full scan would have tested). ``--profile N`` runs the planner once under
cProfile at N chunks for each of ``--families`` and prints the top functions by own time
(file:line, calls, seconds, share of the total).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_merge.formats.torch_dist import write_dcp_metadata
from megatron_merge.ranks import assign_by_bytes, share_balance

RANK_COUNTS = (8, 64, 512)
WRITER_THREADS = 2  # megatron-core's FileSystemWriterAsync default thread_count
PARAM_ALIGNMENT = 64  # elements; _pad_start_of_param_if_needed
BF16, FP32 = torch.bfloat16, torch.float32
OPTIMIZER_STATES = ("fp32_param", "exp_avg", "exp_avg_sq")


def plan_file_bytes(plan) -> dict[str, int]:
    """Bytes per work item (output file) of a plan; the one place that knows the plan's shape."""
    return {item.name: item.nbytes for item in plan.work_items}


# --------------------------------------------------------------------------------------------
# Models and layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense SwiGLU ffn (0 for MoE layers)
    vocab: int
    experts: int = 0
    moe_ffn: int = 0
    bias: bool = False  # qkv / proj / expert biases, router bias
    sinks: bool = False  # per-head attention sink (softmax offset)


LLAMA3_70B = ModelConfig("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256)
GPT_OSS_120B = ModelConfig(
    "gpt-oss-120b", 36, 2880, 64, 8, 64, 0, 201088, experts=128, moe_ffn=2880, bias=True, sinks=True
)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int  # data-parallel size (for MoE: EP x expert-data-parallel)
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def label(self) -> str:
        ep = f" EP={self.ep}" if self.ep > 1 else ""
        return f"TP={self.tp} PP={self.pp} DP={self.dp}{ep} ({self.world} GPUs)"


LAYOUTS = [
    (LLAMA3_70B, Layout(tp=8, pp=4, dp=8)),
    (LLAMA3_70B, Layout(tp=8, pp=4, dp=32)),
    (LLAMA3_70B, Layout(tp=8, pp=8, dp=16)),
    (GPT_OSS_120B, Layout(tp=2, pp=4, dp=32, ep=16)),
    (GPT_OSS_120B, Layout(tp=1, pp=2, dp=64, ep=64)),
]


@dataclass(frozen=True)
class Param:
    """One parameter as one rank holds it (megatron-core ShardedTensor terms)."""

    key: str
    global_shape: tuple[int, ...]  # with the prepended layer (and expert) axes
    offset: tuple[int, ...]  # global offset of this rank's piece
    local_shape: tuple[int, ...]  # with 1s for the prepended axes
    tp_sharded: bool  # False: replicated over TP, saved by TP rank 0 only
    expert: int | None = None  # global expert index (expert buffer)
    swiglu_axis: int | None = None  # fc1: stored as two chunks (w and v halves) on this axis

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    def shards(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offset, local shape) of the chunks the weight is saved as."""
        if self.swiglu_axis is None:
            return [(self.offset, self.local_shape)]
        a = self.swiglu_axis
        half = self.local_shape[a] // 2
        full = self.global_shape[a] // 2
        shape = self.local_shape[:a] + (half,) + self.local_shape[a + 1:]
        w = self.offset[:a] + (self.offset[a] // 2,) + self.offset[a + 1:]
        v = self.offset[:a] + (full + self.offset[a] // 2,) + self.offset[a + 1:]
        return [(w, shape), (v, shape)]


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def _stage_layers(model: ModelConfig, layout: Layout, pp: int) -> range:
    per = model.layers // layout.pp
    return range(pp * per, (pp + 1) * per)


def local_params(model: ModelConfig, layout: Layout, pp: int, tp: int, ep: int) -> list[Param]:
    """The parameters of rank (pp, tp, ep), in model.parameters() order."""
    T, L, h = layout.tp, model.layers, model.hidden
    vocab = _pad(model.vocab, 128 * T)
    q_out = model.heads * model.head_dim
    qkv_out = q_out + 2 * model.kv_heads * model.head_dim
    params: list[Param] = []

    def add(key, shape, split=None, prepend=(), expert=None, swiglu=False):
        """shape: the tensor's global shape; split: TP-sharded axis; prepend: (index, count)."""
        gshape = tuple(c for _, c in prepend) + tuple(shape)
        local = [1] * len(prepend) + list(shape)
        offset = [i for i, _ in prepend] + [0] * len(shape)
        if split is not None:
            axis = len(prepend) + split
            local[axis] = shape[split] // T
            offset[axis] = tp * local[axis]
        params.append(Param(
            key, gshape, tuple(offset), tuple(local), split is not None, expert,
            len(prepend) + split if swiglu else None,
        ))

    if pp == 0:
        add("embedding.word_embeddings.weight", (vocab, h), split=0)
    for layer in _stage_layers(model, layout, pp):
        at = ((layer, L),)
        add("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (h,), prepend=at)
        add("decoder.layers.self_attention.linear_qkv.weight", (qkv_out, h), split=0, prepend=at)
        if model.bias:
            add("decoder.layers.self_attention.linear_qkv.bias", (qkv_out,), split=0, prepend=at)
        if model.sinks:
            add("decoder.layers.self_attention.core_attention.softmax_offset", (model.heads,),
                split=0, prepend=at)
        add("decoder.layers.self_attention.linear_proj.weight", (h, q_out), split=1, prepend=at)
        if model.bias:
            add("decoder.layers.self_attention.linear_proj.bias", (h,), prepend=at)
        if not model.experts:
            add("decoder.layers.mlp.linear_fc1.layer_norm_weight", (h,), prepend=at)
            add("decoder.layers.mlp.linear_fc1.weight", (2 * model.ffn, h), split=0, prepend=at,
                swiglu=True)
            add("decoder.layers.mlp.linear_fc2.weight", (h, model.ffn), split=1, prepend=at)
            continue
        add("decoder.layers.pre_mlp_layernorm.weight", (h,), prepend=at)
        add("decoder.layers.mlp.router.weight", (model.experts, h), prepend=at)
        if model.bias:
            add("decoder.layers.mlp.router.bias", (model.experts,), prepend=at)
        per_rank = model.experts // layout.ep
        for e in range(ep * per_rank, (ep + 1) * per_rank):
            at_e = ((layer, L), (e, model.experts))
            f = model.moe_ffn
            add("decoder.layers.mlp.experts.linear_fc1.weight", (2 * f, h), split=0, prepend=at_e,
                expert=e, swiglu=True)
            if model.bias:
                add("decoder.layers.mlp.experts.linear_fc1.bias", (2 * f,), split=0, prepend=at_e,
                    expert=e, swiglu=True)
            add("decoder.layers.mlp.experts.linear_fc2.weight", (h, f), split=1, prepend=at_e,
                expert=e)
            if model.bias:
                add("decoder.layers.mlp.experts.linear_fc2.bias", (h,), prepend=at_e, expert=e)
    if pp == layout.pp - 1:
        add("decoder.final_layernorm.weight", (h,))
        add("output_layer.weight", (vocab, h), split=0)
    return params


def extra_state_keys(model: ModelConfig, layout: Layout, pp: int, ep: int) -> list[str]:
    """Transformer Engine ``_extra_state`` objects of a stage (saved by TP rank 0, DP rank ``ep``:
    the first expert-data-parallel rank of that expert-parallel rank)."""
    L, E = model.layers, model.experts
    keys = []
    for layer in _stage_layers(model, layout, pp):
        if ep == 0:
            for module in ("self_attention.linear_qkv", "self_attention.core_attention",
                           "self_attention.linear_proj") + (
                               () if E else ("mlp.linear_fc1", "mlp.linear_fc2")):
                keys.append(f"decoder.layers.{module}._extra_state/shard_{layer}_{L}")
        if E:
            per_rank = E // layout.ep
            for e in range(ep * per_rank, (ep + 1) * per_rank):
                for module in ("linear_fc1", "linear_fc2"):
                    keys.append(
                        f"decoder.layers.mlp.experts.{module}._extra_state/shard_{layer}.{e}_{L}.{E}"
                    )
    return keys


# --------------------------------------------------------------------------------------------
# What the save writes: items per rank, files per rank
# --------------------------------------------------------------------------------------------

# An item of a .distcp file: (key, offsets | None, sizes | None, dtype | None, length, payload | None)


@dataclass
class SyntheticCheckpoint:
    """Everything needed to write the checkpoint: tensor metadata, and each file's items."""

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], list]]  # key -> dtype, size, chunks
    objects: list[str]  # bytes-item keys
    files: dict[str, list[tuple]]  # file name -> items in file order

    def file_sizes(self) -> dict[str, int]:
        return {name: sum(item[4] for item in items) for name, items in self.files.items()}

    @property
    def n_chunks(self) -> int:
        return sum(len(chunks) for _, _, chunks in self.tensors.values())



_HEADER_BYTES: dict[tuple[int, torch.dtype], int] = {}


def item_length(sizes: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a ``torch.save`` of a chunk: its data plus the archive's header, measured once
    per rank and dtype on a one-element tensor (a few bytes off for large shapes, whose
    pickled sizes take more digits; what matters is that files and metadata agree)."""
    key = (len(sizes), dtype)
    if key not in _HEADER_BYTES:
        tiny = torch.zeros((1,) * len(sizes), dtype=dtype)
        buffer = io.BytesIO()
        torch.save(tiny, buffer)
        _HEADER_BYTES[key] = len(buffer.getvalue()) - tiny.nbytes
    return math.prod(sizes) * dtype.itemsize + _HEADER_BYTES[key]


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rng_payload() -> bytes:
    """A rank's RNG state as Megatron-LM stores it (a ShardedObject: ``torch.save([[state]])``)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
        "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
    }
    return _saved([[state]])


def extra_state_payload() -> bytes:
    """A Transformer Engine module's ``_extra_state`` without FP8 (an empty uint8 tensor).

    Not an empty ``io.BytesIO``: protocol 2 pickles its ``b""`` as a call of ``builtins.bytes``,
    which the safe reader refuses (a non-empty BytesIO loads)."""
    return _saved([torch.empty(0, dtype=torch.uint8)])


def _buffer_pieces(params: list[Param], group_size: int):
    """(param, start, stop, group rank) for every piece of the distributed optimizer's shards.

    megatron-core's ``_ParamAndGradBuffer``: parameters in reverse order, each start padded to
    64 elements; a bucket closes once it holds ``bucket_size`` elements and its end is padded to
    ``lcm(DP, 128)``; each DP rank owns an equal contiguous slice of every bucket.
    """
    bucket_size = max(40_000_000, 1_000_000 * group_size)
    divisor = math.lcm(group_size, 128)
    index, buckets, members = [], [], []
    start = bucket_start = 0
    for param in params[::-1]:
        start = _pad(start, PARAM_ALIGNMENT)
        end = start + param.numel
        members.append((param, start, end))
        if end - bucket_start >= bucket_size:
            buckets.append((bucket_start, _pad(end, divisor), members))
            bucket_start = start = _pad(end, divisor)
            members = []
        else:
            start = end
    if members:
        buckets.append((bucket_start, _pad(members[-1][2], divisor), members))
    for b_start, b_end, members in buckets:
        share = (b_end - b_start) // group_size
        for param, p_start, p_end in members:
            first = (p_start - b_start) // share
            last = (p_end - 1 - b_start) // share
            for rank in range(first, last + 1):
                lo = max(p_start, b_start + rank * share)
                hi = min(p_end, b_start + (rank + 1) * share)
                if hi > lo:
                    index.append((param, lo - p_start, hi - p_start, rank))
    return index


def _flat_chunk(offset, local_shape, global_shape, start, stop):
    """DCP chunk of a flattened-range piece: megatron-core saves a ``[X, Y, Z]`` tensor with
    local shape ``[x, y, z]`` as ``[X // x, Y // y, Z // z, x * y * z]``, the last axis sliced."""
    grid = tuple(g // l for g, l in zip(global_shape, local_shape))
    offsets = tuple(o // l for o, l in zip(offset, local_shape)) + (start,)
    sizes = (1,) * len(local_shape) + (stop - start,)
    return offsets, sizes, grid + (math.prod(local_shape),)


def build_checkpoint(model: ModelConfig, layout: Layout) -> SyntheticCheckpoint:
    """The ``.distcp`` files megatron-core's fully parallel ``torch_dist`` save writes."""
    from megatron.core.dist_checkpointing.exchange_utils import distribute_shards_to_ranks
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        _split_by_size_and_type,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    T, P, D, E = layout.tp, layout.pp, layout.dp, layout.ep
    tensors: dict[str, list] = {}
    rank_items: list[list[tuple]] = [[] for _ in range(layout.world)]
    rng, extra = rng_payload(), extra_state_payload()
    dense_prefix = "chained_0." if model.experts else ""  # MoE: dense and expert optimizers chained

    for pp in range(P):
        for tp in range(T):
            by_ep = {ep: local_params(model, layout, pp, tp, ep) for ep in range(E)}
            holders: dict[tuple, list[int]] = {}
            size: dict[tuple, int] = {}
            chunk: dict[tuple, tuple] = {}  # shard id -> (key, offsets, sizes, dtype, global)
            for dp in range(D):  # model weights: every DP rank holding one may write it
                for param in by_ep[dp % E]:
                    if not (param.tp_sharded or tp == 0):
                        continue
                    for offset, shape in param.shards():
                        sid = (param.key, offset, None)
                        holders.setdefault(sid, []).append(dp)
                        size[sid] = math.prod(shape) * BF16.itemsize
                        chunk[sid] = (param.key, offset, shape, BF16, param.global_shape)
            groups = [([p for p in by_ep[0] if p.expert is None], list(range(D)), dense_prefix)]
            groups += [
                ([p for p in by_ep[ep] if p.expert is not None], list(range(ep, D, E)), "chained_1.")
                for ep in range(E) if model.experts
            ]
            for params, ranks, prefix in groups:  # optimizer pieces: written by their owner
                for param, start, stop, member in _buffer_pieces(params, len(ranks)):
                    if not (param.tp_sharded or tp == 0):
                        continue
                    half = param.numel // 2
                    if param.swiglu_axis is None:
                        pieces = [(param.offset, param.local_shape, start, stop)]
                    else:
                        (w, shape), (v, _) = param.shards()
                        pieces = [(w, shape, start, min(stop, half)),
                                  (v, shape, max(start, half) - half, stop - half)]
                    for offset, shape, lo, hi in pieces:
                        if hi <= lo:
                            continue
                        flat = _flat_chunk(offset, shape, param.global_shape, lo, hi)
                        for state in OPTIMIZER_STATES:
                            key = f"{prefix}optimizer.state.{state}.{param.key}"
                            sid = (key, offset, (lo, hi))
                            holders[sid] = [ranks[member]]
                            size[sid] = math.prod(shape) * FP32.itemsize  # as _shard_size
                            chunk[sid] = (key, flat[0], flat[1], FP32, flat[2])
            writer = distribute_shards_to_ranks(holders, size, D, set())
            for sid, dp in writer.items():
                key, offsets, sizes, dtype, global_shape = chunk[sid]
                entry = tensors.setdefault(key, [dtype, global_shape, []])
                entry[2].append((offsets, sizes))
                rank = tp + T * (dp + D * pp)
                rank_items[rank].append(
                    (key, offsets, sizes, dtype, item_length(sizes, dtype), None)
                )
            for dp in range(D):
                key = f"rng_state/shard_{pp}.{tp}.{dp}_{P}.{T}.{D}"
                rank_items[tp + T * (dp + D * pp)].append((key, None, None, None, len(rng), rng))
            if tp == 0:
                for ep in range(E):
                    for key in extra_state_keys(model, layout, pp, ep):
                        rank_items[T * (ep + D * pp)].append(
                            (key, None, None, None, len(extra), extra)
                        )

    files: dict[str, list[tuple]] = {}
    for rank, items in enumerate(rank_items):
        write_items = [
            WriteItem(MetadataIndex(key, None, i), WriteItemType.BYTE_IO) if offsets is None else
            WriteItem(
                MetadataIndex(key, offsets, i), WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                    TensorProperties(dtype=dtype), torch.Size(tensors[key][1]),
                ),
            )
            for i, (key, offsets, sizes, dtype, _, _) in enumerate(items)
        ]
        for thread, bucket in enumerate(_split_by_size_and_type(WRITER_THREADS, write_items)):
            if not bucket:
                continue
            # FileSystemWriterAsync writes a file's bytes items first, then its tensors.
            ordered = sorted(bucket, key=lambda w: w.type != WriteItemType.BYTE_IO)
            files[f"__{rank}_{thread}.distcp"] = [items[w.index.index] for w in ordered]
    objects = sorted({item[0] for items in files.values() for item in items if item[1] is None})
    return SyntheticCheckpoint({k: tuple(v) for k, v in tensors.items()}, objects, files)


def scaling_shape(n_chunks: int, family: str) -> tuple[int, int]:
    """(parameters, chunks per key) of a scaling checkpoint; each parameter is 4 keys."""
    if family == "per-key":
        return max(1, n_chunks // (4 * 8)), 8
    return 64, max(1, n_chunks // (4 * 64))


def scaling_overlap_tests(n_chunks: int, family: str, inputs: int = 2) -> int:
    """:func:`overlap_tests` of a scaling checkpoint (2 of its 4 keys per parameter are merged)."""
    n_params, per_key = scaling_shape(n_chunks, family)
    return inputs * 2 * n_params * per_key**2


def scaling_checkpoint(n_chunks: int, family: str) -> SyntheticCheckpoint:
    """``n_chunks`` tiny chunks (4 x 8), 4 keys per parameter, spread over ranks x 2 files."""
    n_params, per_key = scaling_shape(n_chunks, family)
    ranks = min(512, max(4, n_chunks // 2000))
    rows, cols = 4, 8
    tensors, files = {}, {}
    for p in range(n_params):
        base = f"decoder.layers.p{p}.weight"
        keys = [(base, BF16)] + [(f"optimizer.state.{s}.{base}", FP32) for s in OPTIMIZER_STATES]
        chunks = [((c * rows, 0), (rows, cols)) for c in range(per_key)]
        for key, dtype in keys:
            tensors[key] = (dtype, (per_key * rows, cols), chunks)
        for c, (offsets, sizes) in enumerate(chunks):
            serial = p * per_key + c
            name = f"__{serial % ranks}_{(serial // ranks) % WRITER_THREADS}.distcp"
            items = files.setdefault(name, [])
            for key, dtype in keys:
                items.append((key, offsets, sizes, dtype, item_length(sizes, dtype), None))
    rng = rng_payload()
    objects = []
    for rank in range(ranks):
        key = f"rng_state/shard_0.0.{rank}_1.1.{ranks}"
        files.setdefault(f"__{rank}_0.distcp", []).insert(0, (key, None, None, None, len(rng), rng))
        objects.append(key)
    return SyntheticCheckpoint(tensors, objects, files)


# --------------------------------------------------------------------------------------------
# Writing the synthetic inputs
# --------------------------------------------------------------------------------------------

MEGATRON_CONFIG = {
    "sharded_backend": "torch_dist", "sharded_backend_version": 1,
    "common_backend": "torch", "common_backend_version": 1,
}


def _write_common(path: Path, iteration: int) -> None:
    common = {
        "iteration": iteration,
        "checkpoint_version": 3.0,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": {"distrib_optim_sharding_type": "fully_sharded_model_space"},
        "optimizer": {"param_groups": [{"lr": 3e-4, "weight_decay": 0.1, "params": [0]}]},
        "opt_param_scheduler": {"num_steps": iteration},
    }
    torch.save(common, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(MEGATRON_CONFIG))


def write_inputs(ckpt: SyntheticCheckpoint, root: Path) -> tuple[list[Path], int]:
    """Two inputs (iterations 100 and 200) sharing one set of sparse files and one ``.metadata``
    (the second links to the first's); returns their paths and the ``.metadata`` size."""
    first, second = root / "iter_0000100", root / "iter_0000200"
    first.mkdir(parents=True)
    storage = {}
    for name, items in ckpt.files.items():
        offset = 0
        with open(first / name, "wb") as f:
            for key, offsets, _, _, length, payload in items:
                if payload is not None:
                    f.seek(offset)
                    f.write(payload)
                storage[MetadataIndex(key, offsets)] = _StorageInfo(name, offset, length)
                offset += length
            f.truncate(offset)  # sparse: tensor bytes are never written
    state_dict_metadata = {
        key: TensorStorageMetadata(
            TensorProperties(dtype=dtype), torch.Size(size),
            [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks],
        )
        for key, (dtype, size, chunks) in ckpt.tensors.items()
    }
    state_dict_metadata.update({key: BytesStorageMetadata() for key in ckpt.objects})
    metadata = Metadata(
        state_dict_metadata,
        planner_data={key: (key,) for key in state_dict_metadata},
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=str(first), save_id=str(uuid.uuid4())),
    )
    write_dcp_metadata(first, metadata)
    _write_common(first, 100)
    second.mkdir()
    for name in [*ckpt.files, ".metadata"]:
        (second / name).symlink_to(first / name)
    _write_common(second, 200)
    return [first, second], (first / ".metadata").stat().st_size


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def balance_records(model: ModelConfig, layout: Layout, sizes: dict[str, int]) -> list[dict]:
    values = list(sizes.values())
    total = sum(values)
    records = []
    for ranks in RANK_COUNTS:
        shares = assign_by_bytes(values, ranks)
        counts = [len(s) for s in shares]
        mean = total / ranks
        records.append(emit({
            "bench": "balance", "model": model.name, "layout": layout.label,
            "files": len(values), "total_gib": round(total / 2**30, 1),
            "largest_file_gib": round(max(values) / 2**30, 3), "ranks": ranks,
            "balance": round(share_balance(values, shares), 4),
            "bound": round(max(max(values), mean) / mean, 4),
            "items_min": min(counts), "items_mean": round(len(values) / ranks, 2),
            "items_max": max(counts), "idle": counts.count(0),
        }))
    return records


def overlap_tests(ckpt: SyntheticCheckpoint, inputs: int = 2) -> int:
    """Box intersections a full scan computes: every merged chunk tested against every stored
    chunk of its key in each input, ``inputs x sum over merged keys of chunks^2`` (weights and
    fp32 master weights). The planner's chunk index tests only the chunks a bisection finds."""
    return inputs * sum(
        len(chunks) ** 2 for key, (dtype, _, chunks) in ckpt.tensors.items()
        if ".exp_avg" not in key and dtype.is_floating_point
    )


def run_balance() -> list[dict]:
    records = []
    for model, layout in LAYOUTS:
        started = time.perf_counter()
        ckpt = build_checkpoint(model, layout)
        sizes = ckpt.file_sizes()
        records.append(emit({
            "bench": "layout", "model": model.name, "layout": layout.label,
            "chunks": ckpt.n_chunks, "objects": len(ckpt.objects), "keys": len(ckpt.tensors),
            "files": len(sizes), "total_gib": round(sum(sizes.values()) / 2**30, 1),
            "max_chunks_per_key": max(len(c) for _, _, c in ckpt.tensors.values()),
            "overlap_tests": overlap_tests(ckpt),
            "build_s": round(time.perf_counter() - started, 1),
        }))
        records += balance_records(model, layout, sizes)
    return records


def plan_in_subprocess(inputs: list[Path], sizes_out: Path | None = None, timeout=None) -> dict:
    """``plan_merge`` of the inputs in a fresh interpreter: its seconds and peak RSS."""
    cmd = [sys.executable, __file__, "--_plan", *map(str, inputs)]
    if sizes_out is not None:
        cmd += ["--_sizes-out", str(sizes_out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "timeout_s": timeout}
    if done.returncode != 0:
        raise RuntimeError(f"planning failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _plan_main(inputs: list[str], sizes_out: str | None) -> None:
    from megatron_merge.offline import plan_merge

    baseline = _status_mib("VmRSS")
    started, cpu_started = time.perf_counter(), time.process_time()
    plan = plan_merge(inputs, "sma")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if sizes_out:
        Path(sizes_out).write_text(json.dumps(plan_file_bytes(plan)))
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "rss_peak_mib": round(_status_mib("VmHWM")),
                      "rss_baseline_mib": round(baseline),
                      "chunks": sum(len(f.items) for f in plan.work_items)}))


def run_plan_check(workdir: Path, timeout: float) -> dict:
    """The smallest layout written as two inputs and planned; the plan's file bytes must equal
    the sizes computed from the layout."""
    model, layout = LAYOUTS[0]
    ckpt = build_checkpoint(model, layout)
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        inputs, metadata_bytes = write_inputs(ckpt, root)
        measured = plan_in_subprocess(inputs, root / "sizes.json", timeout)
        record = {"bench": "plan_check", "model": model.name, "layout": layout.label,
                  "chunks": ckpt.n_chunks, "metadata_mib": round(metadata_bytes / 2**20, 1)}
        if measured.get("timed_out"):
            return emit({**record, **measured, "equal": None})
        planned = json.loads((root / "sizes.json").read_text())
        return emit({**record, "equal": planned == ckpt.file_sizes(),
                     "plan_s": round(measured["seconds"], 1), "cpu_s": round(measured["cpu_s"], 1),
                     "overlap_tests": overlap_tests(ckpt),
                     "rss_peak_mib": measured["rss_peak_mib"],
                     "load_avg": round(os.getloadavg()[0], 1)})
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_plan_times(families, sizes, workdir: Path, budget: float) -> list[dict]:
    records = []
    for family in families:
        previous = None  # (chunks, wall seconds, CPU seconds)
        growth = 1.0
        for n in sizes:
            if previous is not None:
                projected = previous[1] * (n / previous[0]) ** max(growth, 1.0)
                if projected > budget:
                    records.append(emit({
                        "bench": "plan_time", "family": family, "chunks": n, "skipped": True,
                        "projected_s": round(projected),
                        "overlap_tests": scaling_overlap_tests(n, family),
                    }))
                    continue
            ckpt = scaling_checkpoint(n, family)
            root = Path(tempfile.mkdtemp(dir=workdir))
            try:
                started = time.perf_counter()
                inputs, metadata_bytes = write_inputs(ckpt, root)
                write_s = time.perf_counter() - started
                del ckpt
                measured = plan_in_subprocess(inputs)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            seconds, cpu = measured["seconds"], measured["cpu_s"]
            if previous is not None:  # CPU time: wall time on a shared host is noisy
                growth = math.log(cpu / previous[2]) / math.log(n / previous[0])
            records.append(emit({
                "bench": "plan_time", "family": family, "chunks": measured["chunks"],
                "files": len(scaling_files(n)), "plan_s": round(seconds, 3),
                "cpu_s": round(measured["cpu_s"], 3),
                "us_per_chunk": round(1e6 * seconds / measured["chunks"], 1),
                "cpu_us_per_chunk": round(1e6 * measured["cpu_s"] / measured["chunks"], 1),
                "overlap_tests": scaling_overlap_tests(n, family),
                "growth_exponent": round(growth, 2) if previous else None,
                "rss_peak_mib": measured["rss_peak_mib"],
                "rss_baseline_mib": measured["rss_baseline_mib"],
                "metadata_mib": round(metadata_bytes / 2**20, 1), "write_s": round(write_s, 1),
                "load_avg": round(os.getloadavg()[0], 1),
            }))
            previous = (n, seconds, cpu)
    return records


def scaling_files(n_chunks: int) -> range:
    return range(2 * min(512, max(4, n_chunks // 2000)))


def run_profile(n_chunks: int, family: str, workdir: Path, top: int = 15) -> None:
    from megatron_merge.offline import plan_merge

    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        inputs, _ = write_inputs(scaling_checkpoint(n_chunks, family), root)
        profiler = cProfile.Profile()
        profiler.runcall(plan_merge, [str(p) for p in inputs], "sma")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime")
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append((tottime, cumtime, calls, f"{os.path.relpath(file)}:{line}({name})"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    for tottime, cumtime, calls, where in rows[:top]:
        emit({"bench": "profile", "family": family, "chunks": n_chunks, "where": where, "calls": calls,
              "tottime_s": round(tottime, 2), "cumtime_s": round(cumtime, 2),
              "share": round(tottime / total, 3)})


# --------------------------------------------------------------------------------------------
# Tables and entry point
# --------------------------------------------------------------------------------------------


def print_tables(records: list[dict]) -> None:
    layouts = [r for r in records if r["bench"] == "layout"]
    if layouts:
        print("\nlayouts (synthetic torch_dist saves)")
        print(f"{'model':<13} {'layout':<36} {'chunks':>7} {'objects':>7} {'files':>6} "
              f"{'GiB':>7} {'max chunks/key':>14} {'scan pairs':>14}")
        for r in layouts:
            print(f"{r['model']:<13} {r['layout']:<36} {r['chunks']:>7} {r['objects']:>7} "
                  f"{r['files']:>6} {r['total_gib']:>7} {r['max_chunks_per_key']:>14} "
                  f"{r['overlap_tests']:>14.3g}")
    checks = [r for r in records if r["bench"] == "plan_check"]
    for r in checks:
        print(f"\nplan check, {r['model']} {r['layout']}: {r['chunks']} chunks, plan bytes per file "
              f"equal to the layout's: {r['equal']}; plan_merge {r.get('plan_s')} s wall, "
              f"{r.get('cpu_s')} s CPU, peak RSS {r.get('rss_peak_mib')} MiB")
    balance = [r for r in records if r["bench"] == "balance"]
    if balance:
        print("\nbalance of the merge plan (work item = output .distcp file)")
        print(f"{'model':<13} {'layout':<36} {'files':>6} {'GiB':>7} {'ranks':>5} "
              f"{'balance':>8} {'bound':>7} {'items/rank min/mean/max':>24} {'idle':>5}")
        for r in balance:
            items = f"{r['items_min']}/{r['items_mean']}/{r['items_max']}"
            print(f"{r['model']:<13} {r['layout']:<36} {r['files']:>6} {r['total_gib']:>7} "
                  f"{r['ranks']:>5} {r['balance']:>8.3f} {r['bound']:>7.3f} {items:>24} "
                  f"{r['idle']:>5}")
    times = [r for r in records if r["bench"] == "plan_time"]
    if times:
        print("\nplan_merge([a, b], 'sma') time")
        print(f"{'family':<9} {'chunks':>9} {'plan s':>9} {'CPU s':>9} {'CPU us/chunk':>13} "
              f"{'growth':>7} {'RSS MiB':>8} {'.metadata MiB':>14} {'scan pairs':>14}")
        for r in times:
            if r.get("skipped"):
                print(f"{r['family']:<9} {r['chunks']:>9}   skipped: projected >= {r['projected_s']} s "
                      f"({r['overlap_tests']:.3g} pairs a full scan would test)")
                continue
            growth = "" if r["growth_exponent"] is None else f"{r['growth_exponent']:.2f}"
            print(f"{r['family']:<9} {r['chunks']:>9} {r['plan_s']:>9.2f} {r['cpu_s']:>9.2f} "
                  f"{r['cpu_us_per_chunk']:>13.1f} {growth:>7} {r['rss_peak_mib']:>8} "
                  f"{r['metadata_mib']:>14} {r['overlap_tests']:>14.3g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="up to 10^5 chunks, no plan check")
    parser.add_argument("--sizes", type=int, nargs="+", help="chunk counts for (b)")
    parser.add_argument("--families", nargs="+", default=["per-key", "stacked"],
                        choices=["per-key", "stacked"])
    parser.add_argument("--time-budget", type=float, help="skip a size projected to plan longer")
    parser.add_argument("--skip-balance", action="store_true")
    parser.add_argument("--skip-times", action="store_true")
    parser.add_argument("--plan-check", action=argparse.BooleanOptionalAction, default=None,
                        help="plan the smallest full-size layout (default: on unless --quick)")
    parser.add_argument("--check-timeout", type=float, default=1800.0)
    parser.add_argument("--profile", type=int, metavar="CHUNKS")
    parser.add_argument("--dir", type=Path, default=None, help="where the synthetic inputs go")
    parser.add_argument("--_plan", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_sizes-out", dest="sizes_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._plan:
        _plan_main(args._plan, args.sizes_out)
        return 0
    workdir = args.dir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        for family in args.families:
            run_profile(args.profile, family, workdir)
        return 0
    sizes = args.sizes or ([10**3, 10**4, 10**5] if args.quick else [10**3, 10**4, 10**5, 10**6])
    budget = args.time_budget or (20.0 if args.quick else 600.0)
    records: list[dict] = []
    if not args.skip_balance:
        records += run_balance()
    if args.plan_check if args.plan_check is not None else not args.quick:
        records.append(run_plan_check(workdir, args.check_timeout))
    if not args.skip_times:
        records += run_plan_times(args.families, sizes, workdir, budget)
    print_tables(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
