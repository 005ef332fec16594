"""The merge loop, in one place: weighted fp32 accumulation of one piece at a time.

A *piece* is any block of a tensor that one process owns: a chunk stored in a checkpoint file
(offline merging) or a rank's partition of a parameter (in-training merging). Formats only say
which parts of each input make up the piece and where to put the result; this module does the
arithmetic, so every format and both merge modes produce the same bits.

Arithmetic (the contract the tests and every format rely on), for a piece and inputs i = 1..N::

    acc = 0                                            # in the accumulation dtype (fp32 | fp64)
    for i in 1..N:                                     # oldest first
        acc = fl(acc + fl(x_i * fl(w_i)))              # x_i converted exactly to acc dtype
    result = acc.to(source dtype)                      # round to nearest even

``w_i`` is rounded to the accumulation dtype once; multiplication and addition are separate,
correctly rounded operations (no fused multiply-add), so an element's result depends only on
its own input values and the weights -- never on where it sits in a chunk, how the tensor is
sharded, or which SIMD path ran. That is what makes a TP=2 and a TP=1 checkpoint merge to
bit-identical tensors.

EMA is computed by the paper's recursion instead, because an in-training EMA keeps a single
accumulator and offline and online merging must agree bit for bit::

    acc = x_1                                          # exact in the accumulation dtype
    for i in 2..N:
        acc = fl(fl(x_i * fl(alpha)) + fl(acc * fl(1 - alpha)))

which equals ``sum_i w_i x_i`` with the EMA weights up to rounding. :func:`ema_update` is the
one step of it that both the offline loop and the in-training merger call.

Peak memory is the accumulator plus one input part and its converted copy: a few times the
piece size, independent of model size.

Where each part of the loop lives: :class:`PieceAccumulator` is the loop over inputs for one
piece -- the arithmetic above, the check that an input's parts tile the piece, the NaN/Inf
check, the accumulation dtype, the rounding back. :func:`merge_piece` drives one accumulator
through all inputs of a piece (offline merging: ``megatron_merge.offline`` for torch_dist,
``megatron_merge.formats.rank_files`` for legacy and DeepSpeed; the in-training merger's stored
snapshots); the in-training merger's merges of saved checkpoints (``merge.storage: disk``,
PMA-init, loss-spike recovery) hold one accumulator per owned parameter and feed them one
checkpoint at a time, so each checkpoint is read once. :func:`ema_update` is also the step of
the in-training running EMA, whose accumulator lives across the run. Formats only list, read
and write the pieces.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from megatron_merge.errors import MergeError

ACCUMULATE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}

# What a NaN/Inf error tells the user to do: megatron-merge's override by default; callers
# without that flag (the in-training merges) say what their user can do instead.
NONFINITE_HINT = "pass --allow-nonfinite to merge anyway"

Region = tuple[slice, ...]


@dataclass(frozen=True)
class PiecePart:
    """Values from one input that fill ``region`` of the piece being merged.

    ``origin`` says where the values came from (file, key, chunk) for error messages.
    """

    region: Region
    values: torch.Tensor
    origin: str


def resolve_accumulate_dtype(name: str) -> torch.dtype:
    """``"fp32"`` / ``"fp64"`` -> the torch dtype."""
    try:
        return ACCUMULATE_DTYPES[name]
    except KeyError:
        raise MergeError(
            f"accumulate dtype must be one of {sorted(ACCUMULATE_DTYPES)}, got {name!r}"
        ) from None


# Intra-op threads for the merge arithmetic (per process; --workers adds processes). The merge
# is bound by I/O and memory bandwidth, and its elementwise ops run on ~1 MiB blocks (see
# _row_blocks), where more threads only add fork/join cost -- and on shared CPUs each op waits
# for its slowest, descheduled thread: 2 threads ran 10x slower than 1 on a loaded 2-core host.
MERGE_THREADS = 1


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch ops on ``threads`` intra-op threads inside the block, then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge_piece(
    shape: Sequence[int],
    out_dtype: torch.dtype,
    weights: Sequence[float],
    parts_of_input: Callable[[int], Iterable[PiecePart]],
    acc_dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
    describe_piece: str = "piece",
    ema_alpha: float | None = None,
    buffers: PieceBuffers | None = None,
    nonfinite_hint: str = NONFINITE_HINT,
) -> torch.Tensor:
    """Merge one piece: ``sum_i weights[i] * input_i``, cast back to ``out_dtype``.

    Args:
        shape: shape of the piece.
        out_dtype: dtype to store the result in (the source dtype).
        weights: one weight per input, oldest first.
        parts_of_input: ``parts_of_input(i)`` yields the parts of input ``i`` that together
            cover the piece exactly once; they are consumed one at a time (streaming).
        acc_dtype: accumulation dtype (float32, or float64 on request).
        allow_nonfinite: accept NaN/Inf in input values instead of raising.
        describe_piece: how to name the piece in error messages.
        ema_alpha: combine by the EMA recursion with this alpha (``weights`` then only
            give the count of inputs); see the module docstring.
        buffers: reuse this memory for the accumulator and the result (see
            :class:`PieceBuffers`); the result is then valid until the next call with them.
        nonfinite_hint: what the NaN/Inf error tells the user to do (megatron-merge's flag
            by default).

    Raises:
        MergeError: an input's parts do not cover the piece, or hold NaN/Inf.
    """
    piece = PieceAccumulator(shape, out_dtype, weights, acc_dtype=acc_dtype, allow_nonfinite=allow_nonfinite,
                             describe_piece=describe_piece, ema_alpha=ema_alpha, buffers=buffers,
                             nonfinite_hint=nonfinite_hint)
    for i in range(len(weights)):
        piece.add(parts_of_input(i))
    return piece.result()


class PieceAccumulator:
    """One piece's merge, fed one input at a time: what :func:`merge_piece` runs, for callers
    that hold many pieces at once and read each input once for all of them (the in-training
    merger reads a saved checkpoint's whole partition per collective load).

    Arguments as :func:`merge_piece`'s. :meth:`add` takes input ``i``'s parts, oldest input
    first; :meth:`result` gives the merged piece once every input is in. Memory: the
    accumulator (allocated here) plus one part being added.
    """

    def __init__(
        self,
        shape: Sequence[int],
        out_dtype: torch.dtype,
        weights: Sequence[float],
        acc_dtype: torch.dtype = torch.float32,
        allow_nonfinite: bool = False,
        describe_piece: str = "piece",
        ema_alpha: float | None = None,
        buffers: PieceBuffers | None = None,
        nonfinite_hint: str = NONFINITE_HINT,
    ) -> None:
        self.shape = tuple(shape)
        self.out_dtype = out_dtype
        self.weights = list(weights)
        self.acc_dtype = acc_dtype
        self.allow_nonfinite = allow_nonfinite
        self.describe_piece = describe_piece
        self.ema_alpha = ema_alpha
        self.nonfinite_hint = nonfinite_hint
        self._buffers = buffers
        if buffers is None:
            self._acc = torch.zeros(self.shape, dtype=acc_dtype)
        else:
            self._acc = buffers.empty("accumulator", self.shape, acc_dtype).zero_()
        self.added = 0  # inputs accumulated so far

    def add(self, parts: Iterable[PiecePart]) -> None:
        """Accumulate the next input (oldest first): ``parts`` cover the piece exactly once.

        Raises:
            MergeError: the parts do not cover the piece, or hold NaN/Inf.
        """
        i = self.added
        if i >= len(self.weights):
            raise ValueError(f"{self.describe_piece}: all {len(self.weights)} inputs are already added")
        acc = self._acc
        weight_t = torch.tensor(self.weights[i], dtype=self.acc_dtype)
        covered = 0
        for part in parts:
            check_finite(part.values, part.origin, self.allow_nonfinite, self.nonfinite_hint)
            if self.ema_alpha is None:
                add_weighted(acc[part.region], part.values, weight_t)
            else:
                ema_update(acc[part.region], part.values, self.ema_alpha, first=(i == 0))
            covered += part.values.numel()
            del part
        if covered != acc.numel():
            raise MergeError(
                f"input {i + 1} covers {covered} of {acc.numel()} elements of {self.describe_piece}; "
                f"its stored chunks do not tile the tensor"
            )
        self.added += 1

    def result(self) -> torch.Tensor:
        """The merged piece in ``out_dtype`` (round to nearest even), once every input is added."""
        if self.added != len(self.weights):
            raise ValueError(f"{self.describe_piece}: {self.added} of {len(self.weights)} inputs added")
        if self._buffers is None or self.out_dtype == self.acc_dtype:
            return self._acc.to(self.out_dtype)
        return self._buffers.empty("result", self.shape, self.out_dtype).copy_(self._acc)  # rounds as .to() does


class PieceBuffers:
    """Memory that :func:`merge_piece` reuses from one piece to the next.

    Freed blocks over 32 MiB go straight back to the OS (glibc maps them one by one), so a
    fresh accumulator and result per piece are page-faulted in again for every piece -- a
    quarter of an offline merge's CPU time. These buffers grow to the largest piece once.
    """

    def __init__(self) -> None:
        self._memory: dict[str, bytearray] = {}

    def empty(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor in buffer ``name``, valid until the next call
        for ``name``. Its storage is exactly its own bytes (``torch.save`` writes no more)."""
        count = math.prod(shape)
        if count == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        nbytes = count * dtype.itemsize
        memory = self._memory.get(name)
        if memory is None or len(memory) < nbytes:
            memory = self._memory[name] = bytearray(nbytes)
        return torch.frombuffer(memory, dtype=dtype, count=count).view(tuple(shape))


def add_weighted(acc: torch.Tensor, values: torch.Tensor, weight: torch.Tensor | float) -> None:
    """``acc += fl(values * weight)`` in ``acc``'s dtype: one step of the weighted sum."""
    weight = weight if isinstance(weight, torch.Tensor) else torch.tensor(weight, dtype=acc.dtype)
    for acc_block, values_block in _row_blocks(acc, values):
        term = values_block.to(acc.dtype, copy=True)
        term.mul_(weight)
        acc_block.add_(term)  # plain add: no alpha, so no fused multiply-add


def check_finite(values: torch.Tensor, origin: str, allow_nonfinite: bool = False,
                 hint: str = NONFINITE_HINT) -> None:
    """Raise MergeError naming ``origin`` if ``values`` hold NaN/Inf (unless allowed); the
    message ends with ``hint``, what the user can do about it."""
    if not allow_nonfinite and not _all_finite(values):
        raise MergeError(f"non-finite values (NaN/Inf) in {origin}; {hint}")


def ema_update(acc: torch.Tensor, values: torch.Tensor, alpha: float, first: bool) -> None:
    """One EMA step in place: ``acc = values`` for the first input, else
    ``acc = fl(values * alpha) + fl(acc * (1 - alpha))`` in ``acc``'s dtype."""
    if first:
        acc.copy_(values)
        return
    alpha_t = torch.tensor(alpha, dtype=acc.dtype)
    keep_t = torch.tensor(1.0 - alpha, dtype=acc.dtype)
    for acc_block, values_block in _row_blocks(acc, values):
        term = values_block.to(acc.dtype, copy=True)
        term.mul_(alpha_t)
        acc_block.mul_(keep_t)
        acc_block.add_(term)


# Elements per block of an in-place update (1 MiB of fp32). Going block by block keeps the
# converted term in cache between its convert, multiply and add passes, and makes it a small
# temporary that the allocator reuses; a whole-chunk temporary costs a fresh allocation (page
# faults) per chunk and three round trips to memory -- 3-5x the time on large chunks. The
# arithmetic is elementwise, so the result is bit-identical to the whole-tensor form.
_BLOCK_ELEMS = 1 << 18


def _row_blocks(
    acc: torch.Tensor, values: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching views of ``acc`` and ``values`` in blocks of whole rows (dim 0) of about
    ``_BLOCK_ELEMS`` elements; the tensors themselves when small, of other shapes, or off CPU."""
    rows = acc.shape[0] if acc.dim() else 0
    if acc.numel() <= _BLOCK_ELEMS or acc.device.type != "cpu" or values.shape != acc.shape:
        yield acc, values
        return
    step = max(1, _BLOCK_ELEMS * rows // acc.numel())
    for start in range(0, rows, step):
        yield acc[start:start + step], values[start:start + step]


def _all_finite(values: torch.Tensor) -> bool:
    # A NaN/Inf anywhere makes the sum non-finite; a finite sum (one fast reduction) proves
    # every element finite. Only a non-finite sum (or an overflowing one) needs the full check.
    if bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())


def intersect(
    a_offsets: Sequence[int], a_sizes: Sequence[int], b_offsets: Sequence[int], b_sizes: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    """Global offsets and sizes of the overlap of two boxes, or None if they do not overlap."""
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(a_offsets, a_sizes, b_offsets, b_sizes):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return offsets, sizes


def region_within(offsets: Sequence[int], sizes: Sequence[int], base: Sequence[int]) -> Region:
    """Slices selecting the box (``offsets``, ``sizes``) inside a block that starts at ``base``."""
    return tuple(slice(o - b, o - b + s) for o, s, b in zip(offsets, sizes, base))


def numel(sizes: Sequence[int]) -> int:
    return math.prod(sizes)
