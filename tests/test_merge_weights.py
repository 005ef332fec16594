"""Merge weights (formulas, normalisation, edge cases) and checkpoint selection."""

import math

import pytest

from megatron_merge.errors import MergeError
from megatron_merge.selection import (
    explicit_checkpoints,
    iteration_from_path,
    select_checkpoints,
    select_from_run,
)
from megatron_merge.weights import METHODS, merge_weights, parse_weight_list

# ---------------------------------------------------------------------------------- weights


def test_sma_is_uniform():
    assert merge_weights("sma", 4) == [0.25] * 4


def test_ema_matches_the_papers_recursion():
    alpha, n = 0.2, 5
    w = merge_weights("ema", n, alpha=alpha)
    assert w[0] == pytest.approx((1 - alpha) ** (n - 1))
    for i in range(2, n + 1):
        assert w[i - 1] == pytest.approx(alpha * (1 - alpha) ** (n - i))
    assert math.fsum(w) == pytest.approx(1.0)

    # Same as running M^(i) = alpha * M_i + (1 - alpha) * M^(i-1) on one-hot "models".
    recursion = [1.0] + [0.0] * (n - 1)
    for i in range(1, n):
        one_hot = [1.0 if j == i else 0.0 for j in range(n)]
        recursion = [alpha * o + (1 - alpha) * r for o, r in zip(one_hot, recursion)]
    assert w == pytest.approx(recursion)


def test_ema_default_alpha_and_alpha_one():
    assert merge_weights("ema", 3) == pytest.approx(merge_weights("ema", 3, alpha=0.2))
    assert merge_weights("ema", 3, alpha=1.0) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_ema_refuses_alpha_outside_0_1(alpha):
    with pytest.raises(ValueError, match="alpha"):
        merge_weights("ema", 3, alpha=alpha)


def test_wma_grows_linearly():
    w = merge_weights("wma", 4)
    assert w == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_explicit_weights_normalised_or_not():
    assert merge_weights("weights", 3, weights=[1, 1, 2]) == pytest.approx([0.25, 0.25, 0.5])
    assert merge_weights("weights", 3, weights=[1, 1, 2], normalize=False) == [1.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "weights, message",
    [(None, "one weight per checkpoint"), ([1, 2], "2 weights for 3"), ([1, -1, 1], ">= 0"),
     ([0, 0, 0], "all be zero"), ([1, float("inf"), 1], "finite")],
)
def test_explicit_weights_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        merge_weights("weights", 3, weights=weights)


def test_wsm_linear_is_sma():
    assert merge_weights("wsm-linear", 5) == pytest.approx(merge_weights("sma", 5))


def test_wsm_minus_sqrt_telescopes_from_the_decay_shape():
    n = 4
    w = merge_weights("wsm-minus-sqrt", n)
    assert w == pytest.approx([math.sqrt(i / n) - math.sqrt((i - 1) / n) for i in range(1, n + 1)])
    assert math.fsum(w) == pytest.approx(1.0)
    assert all(a > b for a, b in zip(w, w[1:]))  # the fast early decay favours older checkpoints


@pytest.mark.parametrize("method", METHODS)
def test_one_checkpoint_is_refused(method):
    kwargs = {"weights": [1.0]} if method == "weights" else {}
    with pytest.raises(ValueError, match="at least 2"):
        merge_weights(method, 1, **kwargs)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "weights"])
def test_every_method_sums_to_one(method):
    for n in (2, 3, 10, 15):
        assert math.fsum(merge_weights(method, n)) == pytest.approx(1.0)


def test_options_for_other_methods_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        merge_weights("sma", 3, alpha=0.1)
    with pytest.raises(ValueError, match="weights"):
        merge_weights("sma", 3, weights=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown"):
        merge_weights("median", 3)


def test_parse_weight_list():
    assert parse_weight_list("1, 2,3.5") == [1.0, 2.0, 3.5]
    with pytest.raises(ValueError):
        parse_weight_list("1,x")


# -------------------------------------------------------------------------------- selection


@pytest.fixture()
def run_dir(tmp_path):
    for it in (10, 20, 30, 40, 50, 60, 70):
        d = tmp_path / f"iter_{it:07d}"
        d.mkdir()
        (d / "metadata.json").write_text("{}")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("70")
    return tmp_path


def test_last_and_every_count_back_from_the_newest(run_dir):
    refs = select_from_run(run_dir, last=3, every=2)
    assert [r.iteration for r in refs] == [30, 50, 70]
    assert [r.iteration for r in select_from_run(run_dir, last=2)] == [60, 70]


def test_last_needs_enough_iterations(run_dir):
    with pytest.raises(MergeError, match="needs 9 saved iterations"):
        select_from_run(run_dir, last=5, every=2)


def test_iterations_picks_exactly_those(run_dir):
    assert [r.iteration for r in select_from_run(run_dir, iterations=[50, 10])] == [10, 50]
    with pytest.raises(MergeError, match=r"\[35\] were not saved"):
        select_from_run(run_dir, iterations=[10, 35])


def test_explicit_inputs_must_be_oldest_first(run_dir):
    refs = explicit_checkpoints([run_dir / "iter_0000010", run_dir / "iter_0000020"])
    assert [r.iteration for r in refs] == [10, 20]
    assert iteration_from_path(run_dir / "iter_0000020") == 20
    with pytest.raises(MergeError, match="oldest first"):
        explicit_checkpoints([run_dir / "iter_0000020", run_dir / "iter_0000010"])
    with pytest.raises(MergeError, match="twice"):
        explicit_checkpoints([run_dir / "iter_0000010", run_dir / "iter_0000010"])


def test_run_directory_needs_a_selection(run_dir):
    with pytest.raises(MergeError, match="run directory"):
        select_checkpoints([run_dir, run_dir / "iter_0000010"])
    with pytest.raises(MergeError, match="exactly one run directory"):
        select_checkpoints([run_dir, run_dir], last=2)
    with pytest.raises(MergeError, match="--every needs --last"):
        select_checkpoints([run_dir], every=2)
