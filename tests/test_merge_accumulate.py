"""The merge loop (megatron_merge.accumulate) on its own: arithmetic, assembly, checks."""

import pytest
import torch

from megatron_merge.accumulate import PieceAccumulator, PiecePart, intersect, merge_piece, region_within
from megatron_merge.errors import MergeError


def whole(t, origin="x"):
    return [PiecePart(tuple(slice(0, s) for s in t.shape), t, origin)]


def test_arithmetic_is_separate_multiply_then_add_in_order():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1000, generator=gen) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    got = merge_piece((1000,), torch.float32, w, lambda i: whole(xs[i]))
    expected = torch.zeros(1000)
    for x, wi in zip(xs, w):
        expected = expected + x * wi
    assert torch.equal(got, expected)


def test_result_is_rounded_back_to_the_source_dtype():
    xs = [torch.tensor([1.0, 2.0, 3.0]).bfloat16(), torch.tensor([1.5, 2.5, 3.3]).bfloat16()]
    got = merge_piece((3,), torch.bfloat16, [0.5, 0.5], lambda i: whole(xs[i]))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ((xs[0].float() * 0.5 + xs[1].float() * 0.5)).bfloat16())


def test_a_piece_assembled_from_parts_equals_the_whole():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 6, generator=gen) for _ in range(2)]

    def halves(i):  # input 1 stored as two row halves, input 0 whole
        if i == 0:
            yield from whole(xs[0])
        else:
            yield PiecePart(region_within([0, 0], [2, 6], [0, 0]), xs[1][:2], "top")
            yield PiecePart(region_within([2, 0], [2, 6], [0, 0]), xs[1][2:], "bottom")

    got = merge_piece((4, 6), torch.float32, [0.25, 0.75], halves)
    assert torch.equal(got, merge_piece((4, 6), torch.float32, [0.25, 0.75], lambda i: whole(xs[i])))


def test_scalar_piece():
    xs = [torch.tensor(1.0), torch.tensor(3.0)]
    assert merge_piece((), torch.float32, [0.5, 0.5], lambda i: whole(xs[i])).item() == 2.0


def test_fp64_accumulation():
    xs = [torch.tensor([1e-8, 1.0]), torch.tensor([1.0, 1e-8])]
    got = merge_piece((2,), torch.float32, [1 / 3, 2 / 3], lambda i: whole(xs[i]), acc_dtype=torch.float64)
    expected = (xs[0].double() * (1 / 3) + xs[1].double() * (2 / 3)).float()
    assert torch.equal(got, expected)


def test_incomplete_coverage_is_an_error():
    x = torch.ones(4)
    with pytest.raises(MergeError, match="covers 2 of 4"):
        merge_piece((4,), torch.float32, [0.5, 0.5],
                    lambda i: [PiecePart((slice(0, 2),), x[:2], "half")])


def test_nonfinite_input_names_its_origin():
    xs = [torch.tensor([1.0, float("inf")]), torch.ones(2)]
    with pytest.raises(MergeError, match="NaN/Inf.*file-A"):
        merge_piece((2,), torch.float32, [0.5, 0.5], lambda i: whole(xs[i], "file-A" if i == 0 else "B"))
    got = merge_piece((2,), torch.float32, [0.5, 0.5], lambda i: whole(xs[i]), allow_nonfinite=True)
    assert torch.isinf(got[1])


def test_pieces_fed_input_by_input_equal_merge_piece():
    """Many pieces, each input read once for all of them (the in-training disk merge's order)."""
    gen = torch.Generator().manual_seed(2)
    inputs = [{name: torch.randn(5, 3, generator=gen) for name in "ab"} for _ in range(3)]
    for ema_alpha in (None, 0.3):
        pieces = {name: PieceAccumulator((5, 3), torch.float32, [0.2, 0.3, 0.5], ema_alpha=ema_alpha)
                  for name in "ab"}
        for x in inputs:
            for name, piece in pieces.items():
                piece.add(whole(x[name]))
        for name, piece in pieces.items():
            expected = merge_piece((5, 3), torch.float32, [0.2, 0.3, 0.5], lambda i: whole(inputs[i][name]),
                                   ema_alpha=ema_alpha)
            assert torch.equal(piece.result(), expected)


def test_piece_accumulator_takes_exactly_its_inputs():
    piece = PieceAccumulator((2,), torch.float32, [0.5, 0.5], describe_piece="w")
    piece.add(whole(torch.ones(2)))
    with pytest.raises(ValueError, match="w: 1 of 2 inputs"):
        piece.result()
    piece.add(whole(torch.ones(2)))
    with pytest.raises(ValueError, match="already added"):
        piece.add(whole(torch.ones(2)))


def test_intersect():
    assert intersect([0, 0], [4, 6], [2, 3], [4, 6]) == ([2, 3], [2, 3])
    assert intersect([0], [4], [4], [4]) is None
