"""The merge engine on Megatron-LM's own checkpoints: the same bytes however the work is spread,
a failure on any rank fails the whole merge, and the options peers offer.

Inputs are the fixtures Megatron-LM's training code wrote (tests/fixtures/megatron_lm/). The
torchrun cases launch 2 launchers on localhost (2 simulated nodes) of 2 ranks each.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from helpers import assert_same_bytes, merge_every_way, run_cli, torchrun_merge
from merge_reference import load_full, model_keys, reference_merge
from megatron_merge.errors import MergeError
from megatron_merge.offline import merge_checkpoints, plan_merge
from megatron_merge.ranks import assign_by_bytes, share_balance

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "megatron_lm"


def inputs(case: str) -> list[Path]:
    return [FIXTURES / case / "iter_0000001", FIXTURES / case / "iter_0000002"]


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"


# ================================================================================================
# One process, local workers, torchrun ranks on two nodes: the same bytes
# ================================================================================================


@pytest.mark.slow  # 5 torchrun workers and 2 spawned processes per case
@pytest.mark.parametrize("case, method", [
    ("torch_dist_dp2_bf16_distopt", ["--method", "ema", "--alpha", "0.3"]),  # buckets with gaps
    ("torch_pp2_bf16_distopt", ["--method", "wma"]),  # legacy rank files + distrib_optim.pt
])
def test_every_way_of_running_writes_the_same_bytes(tmp_path, case, method):
    outputs = merge_every_way([*method, *inputs(case)], tmp_path)
    one = outputs.pop("one_process")
    for way, out in outputs.items():
        assert_same_bytes(one, out)
    assert len([p for p in one.rglob("*") if p.suffix in (".distcp", ".pt")]) >= 4  # work for 4 ranks


def test_assignment_is_balanced_largest_first():
    sizes = [100, 90, 60, 50, 40, 30, 20, 10]
    shares = assign_by_bytes(sizes, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    assert [sizes[share[0]] for share in shares] == [100, 90, 60]  # the largest open each rank
    assert share_balance(sizes, shares) < 1.05
    assert assign_by_bytes(sizes, 3) == shares  # every rank computes the same
    assert share_balance([5], assign_by_bytes([5], 4)) == 4.0  # idle ranks count


# ================================================================================================
# A rank that fails fails the merge everywhere, and nothing is published
# ================================================================================================


def _corrupt_a_file_of_rank(inputs_: list[Path], rank: int, ranks: int) -> Path:
    """Break the zip header of a merged chunk in a file that ``rank`` of ``ranks`` writes
    (planning checks sizes, not contents, so only that rank meets it)."""
    plan = plan_merge(inputs_)
    items = plan.work_items
    share = assign_by_bytes([item.nbytes for item in items], ranks)[rank]
    file_plan = items[share[0]]
    chunk = next(piece for piece in file_plan.items if piece.action == "merge")
    older = plan.checkpoints[0]
    stored = older.chunk_at(chunk.key, chunk.offsets)
    path = older.path / stored.storage.relative_path
    with open(path, "r+b") as f:
        f.seek(stored.storage.offset)
        f.write(b"\0" * 64)
    return path


@pytest.mark.slow  # 4 torchrun workers
def test_a_failing_rank_fails_the_merge_and_leaves_no_output(tmp_path):
    copies = []
    for source in inputs("torch_dist_dp2_bf16_distopt"):
        copies.append(tmp_path / source.name)
        shutil.copytree(source, copies[-1])
    broken = _corrupt_a_file_of_rank(copies, rank=3, ranks=4)
    out = tmp_path / "merged"
    launches = torchrun_merge([*copies, "--out", out])
    assert all(launch.returncode != 0 for launch in launches)
    stderr = "".join(launch.stderr for launch in launches)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-4000:]
    assert "rank 3 of 4" in errors[0] and str(broken) in errors[0] and "corrupt" in errors[0], errors
    assert_no_output(out)


# ================================================================================================
# What the peer offers: explicit weights as given, the output dtype, where unmerged state comes from
# ================================================================================================


def test_negative_weights_as_given_with_no_normalize(tmp_path, caplog):
    case = inputs("torch_dist_tp2_fp32")
    out = tmp_path / "m"
    with caplog.at_level(logging.WARNING, logger="megatron_merge"):
        code, err = run_cli(["--weights=-0.5,1.5", "--no-normalize", "--out", out, *case])
    assert code == 0, err
    assert "negative" in caplog.text  # the warning says what the weights do
    for key in model_keys(case[-1]):
        assert torch.equal(load_full(out, key), reference_merge(case, key, [-0.5, 1.5])), key
    assert json.loads((out / "merge.json").read_text())["weights"] == [-0.5, 1.5]


def test_all_zero_or_negative_normalized_weights_are_refused(tmp_path):
    case = inputs("torch_dist_tp2_fp32")
    code, err = run_cli(["--weights", "0,0", "--no-normalize", "--out", tmp_path / "m", *case])
    assert code == 1 and "must not all be zero" in err
    code, err = run_cli(["--weights=-1,2", "--out", tmp_path / "m", *case])
    assert code == 1 and "--no-normalize" in err
    assert_no_output(tmp_path / "m")


def test_save_dtype_casts_model_weights_only(tmp_path):
    case = inputs("torch_dist_dp2_bf16_distopt_fully_reshardable")
    out = tmp_path / "m"
    merge_checkpoints(case, out, save_dtype="fp32", verify=True)
    stored = FileSystemReader(str(out)).read_metadata().state_dict_metadata
    keys = model_keys(case[-1])
    assert keys
    for key in keys:  # bf16 inputs, saved as fp32: the fp32 accumulation, not rounded to bf16
        assert stored[key].properties.dtype == torch.float32
        expected = torch.zeros(tuple(stored[key].size), dtype=torch.float32)
        for path in case:
            expected = expected + load_full(path, key).float() * torch.tensor(0.5)
        assert torch.equal(load_full(out, key), expected), key
    masters = [k for k in stored if k.startswith("optimizer.state.param.")]
    assert masters and all(stored[k].properties.dtype == torch.float32 for k in masters)
    assert json.loads((out / "merge.json").read_text())["save_dtype"] == "fp32"


def test_state_from_takes_unmerged_state_from_the_chosen_input(tmp_path):
    case = inputs("torch_dist_dp2_bf16_distopt_fully_reshardable")
    default, oldest = tmp_path / "newest", tmp_path / "oldest"
    merge_checkpoints(case, default)
    code, err = run_cli(["--state-from", "1", "--out", oldest, *case])  # iteration 1: the oldest
    assert code == 0, err
    stored = FileSystemReader(str(oldest)).read_metadata().state_dict_metadata
    moments = [k for k in stored if k.startswith("optimizer.state.exp_avg")]
    assert moments
    for key in moments:
        assert torch.equal(load_full(oldest, key), load_full(case[0], key)), key
    for key in model_keys(case[-1]):  # the merged weights do not depend on it
        assert torch.equal(load_full(oldest, key), load_full(default, key)), key
    assert torch.load(oldest / "common.pt", weights_only=False)["iteration"] == 1
    record = json.loads((oldest / "merge.json").read_text())
    assert record["state_from"]["iteration"] == 1
    code, err = run_cli(["--state-from", "7", "--out", tmp_path / "x", *case])
    assert code == 1 and "no input is at that iteration" in err


def test_workers_default_is_chosen_and_reported(tmp_path, caplog):
    case = inputs("torch_dist_tp2_fp32")
    with caplog.at_level(logging.INFO, logger="megatron_merge"):
        code, err = run_cli(["--out", tmp_path / "m", *case])
    assert code == 0, err
    # a few MiB to read: one process, and the log says why
    assert "workers: 1 (" in caplog.text and "GiB to read, one process per 1 GiB" in caplog.text


def test_workers_on_a_torchrun_rank_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(MergeError, match="under torchrun every rank is one worker"):
        merge_checkpoints(inputs("torch_dist_tp2_fp32"), tmp_path / "m", workers=2)


# ================================================================================================
# Planning stays linear: the chunk index finds what a scan of every chunk finds
# ================================================================================================


@pytest.mark.parametrize("case", ["torch_dist_dp2_bf16_distopt", "torch_dist_tp2_bf16_distopt"])
def test_chunk_index_finds_exactly_the_overlapping_chunks(case):
    import random

    from megatron_merge.accumulate import intersect
    from megatron_merge.formats.dcp import TorchDistCheckpoint

    ckpt = TorchDistCheckpoint(inputs(case)[-1])
    rng = random.Random(0)
    queries = 0
    for key in ckpt.keys():
        meta = ckpt.tensor_metadata(key)
        if meta is None or not tuple(meta.size):
            continue
        for _ in range(20):  # random boxes, and every stored chunk's own box
            offsets = [rng.randrange(n) for n in meta.size]
            sizes = [rng.randint(1, n - o) for n, o in zip(meta.size, offsets)]
            boxes = [(offsets, sizes)] + [(c.offsets, c.sizes) for c in ckpt.chunks(key)[:3]]
            for offsets, sizes in boxes:
                found = [(c.offsets, o, s) for c, o, s in ckpt.chunks_overlapping(key, offsets, sizes)]
                scanned = [(c.offsets, *hit) for c in ckpt.chunks(key)
                           if (hit := intersect(c.offsets, c.sizes, offsets, sizes)) is not None]
                assert found == scanned, (key, offsets, sizes)
                queries += 1
    assert queries > 500
