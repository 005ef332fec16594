"""Offline merging of legacy Megatron ``torch`` checkpoints (``mp_rank_*/model_optim_rng.pt``).

Two kinds of fixtures:

* files shaped like Megatron-LM's own (written here with ``torch.save``): ``args`` as an
  ``argparse.Namespace`` holding megatron-core enums, bf16 weights with fp32 master copies in the
  optimizer (``fp32_from_fp16_params``), Transformer Engine ``_extra_state`` as ``io.BytesIO``,
  numpy RNG state, a ``distrib_optim.pt``; at PP=2 and at EP=2, whose rank directories have the
  same names (``mp_rank_00_000``, ``mp_rank_00_001``). Fast.
* real checkpoints written by ``pretrain`` with ``checkpoint.format=torch`` (torchrun, gloo) at
  TP=2 and PP=2, merged with the CLI and loaded back by ``pretrain`` (slow).

The reference merge loads each input file with plain ``torch.load`` and averages in one process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import peak_rss_of_merge, run_cli, run_pretrain
from megatron_merge.errors import MergeError
from megatron_merge.offline import merge_checkpoints
from megatron_merge.weights import merge_weights

MODEL_FILE = "model_optim_rng.pt"
ITERATIONS = (100, 200, 300)


# ================================================================================================
# Megatron-LM-shaped files
# ================================================================================================


def _rank_tensors(iteration: int, stage: int, expert: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * iteration + 10 * stage + expert)
    tensors = {
        f"decoder.layers.{stage}.self_attention.linear_qkv.weight": torch.randn(12, 6, generator=gen),
        f"decoder.layers.{stage}.self_attention.linear_qkv.layer_norm_weight": torch.randn(6, generator=gen),
        f"decoder.layers.{stage}.mlp.experts.local_experts.{expert}.linear_fc1.weight": torch.randn(8, 6, generator=gen),
    }
    if stage == 0:
        tensors["embedding.word_embeddings.weight"] = torch.randn(16, 6, generator=gen)
    return {k: (v * 0.02 + 0.001 * iteration).to(torch.bfloat16) for k, v in tensors.items()}


def megatron_lm_file(iteration: int, stage: int, expert: int, pp: int, ep: int,
                     with_args: bool = True) -> dict:
    """What Megatron-LM's generate_state_dict writes for one rank (format 'torch', bf16)."""
    from megatron.core.rerun_state_machine import RerunMode
    from megatron.core.transformer.enums import AttnBackend

    weights = _rank_tensors(iteration, stage, expert)
    model = OrderedDict()
    for key, value in weights.items():
        model[key] = value
        if key.endswith("linear_qkv.weight"):
            model[key.replace(".weight", "._extra_state")] = io.BytesIO(b"te-extra-%d" % iteration)
    masters = [v.float() + 1e-4 * (i + 1) for i, v in enumerate(weights.values())]  # not bf16-exact
    state = {i: {"exp_avg": torch.full_like(m, 0.01 * iteration), "exp_avg_sq": torch.ones_like(m),
                 "step": torch.tensor(float(iteration))} for i, m in enumerate(masters)}
    sd = {
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": model,
        "optimizer": {
            "optimizer": {"state": state,
                          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": list(state)}]},
            "grad_scaler": None,
            "fp32_from_fp16_params": [masters],
        },
        "opt_param_scheduler": {"num_steps": iteration, "max_lr": 1e-3},
        "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}],
        "rerun_state_machine": {"mode": RerunMode.DISABLED, "sample_stats": {}},
        "num_floating_point_operations_so_far": 1.5e12 * iteration,
    }
    if with_args:
        sd["args"] = argparse.Namespace(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
            params_dtype=torch.bfloat16, attention_backend=AttnBackend.auto, consumed_train_samples=8 * iteration,
        )
    return sd


def write_megatron_lm_checkpoint(directory: Path, iteration: int, pp: int = 2, ep: int = 1,
                                 with_args: bool = True, distrib_optim: bool = False) -> Path:
    directory.mkdir(parents=True)
    for stage in range(pp):
        for expert in range(ep):
            name = "mp_rank_00" + (f"_{stage:03d}" if pp > 1 else "") + (f"_{expert:03d}" if ep > 1 else "")
            (directory / name).mkdir()
            torch.save(megatron_lm_file(iteration, stage, expert, pp, ep, with_args), directory / name / MODEL_FILE)
            if distrib_optim:
                gen = torch.Generator().manual_seed(iteration + stage)
                torch.save({0: {(torch.bfloat16, torch.float32): {
                    "param": [torch.randn(40, generator=gen)], "exp_avg": [torch.randn(40, generator=gen)],
                    "exp_avg_sq": [torch.rand(40, generator=gen)], "numel_unpadded": 37}},
                    "per_bucket_numel": [40]}, directory / name / "distrib_optim.pt")
    return directory


@pytest.fixture(scope="module")
def lm_ckpts(tmp_path_factory):
    """run_pp2/ and run_ep2/ (iter_0000100..300): the same rank directory names, different meaning."""
    root = tmp_path_factory.mktemp("megatron_lm")
    for it in ITERATIONS:
        write_megatron_lm_checkpoint(root / "run_pp2" / f"iter_{it:07d}", it, pp=2, distrib_optim=True)
        write_megatron_lm_checkpoint(root / "run_ep2" / f"iter_{it:07d}", it, pp=1, ep=2)
        write_megatron_lm_checkpoint(root / "no_args" / f"iter_{it:07d}", it, pp=2, with_args=False)
    for run in ("run_pp2", "run_ep2", "no_args"):
        (root / run / "latest_checkpointed_iteration.txt").write_text(f"{ITERATIONS[-1]}\n")
    return root


def load_raw(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def reference(paths: list[Path], slot: tuple, weights: list[float] | None = None,
              ema_alpha: float | None = None) -> torch.Tensor:
    """sum_i w_i * x_i, oldest first, in fp32, rounded back once. With ``ema_alpha``: the paper's
    recursion M = a * x_i + (1 - a) * M, starting from M = x_1."""
    tensors = []
    for path in paths:
        value = load_raw(path)
        for key in slot:
            value = value[key]
        tensors.append(value)
    if ema_alpha is not None:
        a, keep = torch.tensor(ema_alpha), torch.tensor(1 - ema_alpha)
        acc = tensors[0].to(torch.float32)
        for tensor in tensors[1:]:
            acc = tensor.to(torch.float32) * a + acc * keep
        return acc.to(tensors[0].dtype)
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        acc = acc + tensor.to(torch.float32) * weight
    return acc.to(tensors[0].dtype)



def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}.*")], "temporary output left behind"


def it_dir(run: Path, it: int) -> Path:
    return run / f"iter_{it:07d}"


# ================================================================================================
# Megatron-LM-shaped files: correctness
# ================================================================================================


@pytest.mark.parametrize("run", ["run_pp2", "run_ep2"])
def test_merge_each_rank_file_is_bit_exact(lm_ckpts, tmp_path, run):
    inputs = [it_dir(lm_ckpts / run, it) for it in ITERATIONS]
    out = tmp_path / "merged"
    code, err = run_cli(["--method", "wma", "--verify", "--out", out, *inputs])
    assert code == 0, err
    weights = merge_weights("wma", 3)
    rank_dirs = sorted(p.name for p in inputs[-1].iterdir())
    assert rank_dirs == ["mp_rank_00_000", "mp_rank_00_001"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*rank_dirs, "merge.json"])
    for rank_dir in rank_dirs:
        files = [d / rank_dir / MODEL_FILE for d in inputs]
        merged, newest = load_raw(out / rank_dir / MODEL_FILE), load_raw(files[-1])
        for key, value in newest["model"].items():
            if isinstance(value, torch.Tensor):
                expected = reference(files, ("model", key), weights)
                assert merged["model"][key].dtype == torch.bfloat16
                assert torch.equal(merged["model"][key], expected), key
                assert not torch.equal(merged["model"][key], value), key
            else:  # TE extra state: the newest input's
                assert merged["model"][key].getvalue() == value.getvalue()
        # fp32 master weights merge too (a resumed optimizer copies them into the model) ...
        for i, master in enumerate(newest["optimizer"]["fp32_from_fp16_params"][0]):
            expected = reference(files, ("optimizer", "fp32_from_fp16_params", 0, i), weights)
            assert torch.equal(merged["optimizer"]["fp32_from_fp16_params"][0][i], expected)
        # ... while Adam's moments, the scheduler, RNG, args and rerun state are the newest's.
        assert torch.equal(merged["optimizer"]["optimizer"]["state"][0]["exp_avg"],
                           newest["optimizer"]["optimizer"]["state"][0]["exp_avg"])
        assert merged["opt_param_scheduler"] == newest["opt_param_scheduler"]
        assert merged["args"] == newest["args"] and merged["iteration"] == ITERATIONS[-1]
        assert merged["rerun_state_machine"] == newest["rerun_state_machine"]
        assert np.array_equal(merged["rng_state"][0]["np_rng_state"][1], newest["rng_state"][0]["np_rng_state"][1])
    record = json.loads((out / "merge.json").read_text())
    assert record["format"] == "torch"
    assert record["layout"]["pipeline_model_parallel_size"] == (2 if run == "run_pp2" else 1)
    assert record["layout"]["expert_model_parallel_size"] == (2 if run == "run_ep2" else 1)
    assert "optimizer/fp32_from_fp16_params/0/0" in record["merged"][f"{rank_dirs[0]}/{MODEL_FILE}"]
    assert "args" in record["copied_from_newest"][f"{rank_dirs[0]}/{MODEL_FILE}"]


def test_distributed_optimizer_file_merges_its_master_weights(lm_ckpts, tmp_path):
    inputs = [it_dir(lm_ckpts / "run_pp2", it) for it in ITERATIONS[1:]]
    merge_checkpoints(inputs, tmp_path / "m", "sma")
    files = [d / "mp_rank_00_001" / "distrib_optim.pt" for d in inputs]
    merged, newest = load_raw(tmp_path / "m" / "mp_rank_00_001" / "distrib_optim.pt"), load_raw(files[-1])
    key = (torch.bfloat16, torch.float32)
    assert torch.equal(merged[0][key]["param"][0], reference(files, (0, key, "param", 0), [0.5, 0.5]))
    assert torch.equal(merged[0][key]["exp_avg"][0], newest[0][key]["exp_avg"][0])
    assert merged[0][key]["numel_unpadded"] == 37


def test_model_only_drops_optimizer_state(lm_ckpts, tmp_path):
    inputs = [it_dir(lm_ckpts / "run_pp2", it) for it in ITERATIONS[1:]]
    out = tmp_path / "m"
    merge_checkpoints(inputs, out, "sma", model_only=True)
    merged = load_raw(out / "mp_rank_00_000" / MODEL_FILE)
    assert "optimizer" not in merged and "opt_param_scheduler" not in merged
    assert "rng_state" in merged and merged["iteration"] == ITERATIONS[-1]
    assert not list(out.rglob("distrib_optim.pt"))
    record = json.loads((out / "merge.json").read_text())
    assert record["dropped"][f"mp_rank_00_000/{MODEL_FILE}"] == ["optimizer", "opt_param_scheduler"]
    assert "mp_rank_00_000/distrib_optim.pt" in record["dropped"]


def test_run_directory_selection_and_dry_run(lm_ckpts, tmp_path, capsys):
    code, err = run_cli(["--dry-run", "--last", "2", "--out", tmp_path / "dry", lm_ckpts / "run_ep2"])
    assert code == 0, err
    printed = capsys.readouterr().out
    assert "format: torch (tensor_model_parallel_size=1, pipeline_model_parallel_size=1, " \
           "expert_model_parallel_size=2)" in printed and "weight 0.500000" in printed
    assert_no_output(tmp_path / "dry")


# ================================================================================================
# Bad input: an error line naming the file and key, non-zero exit, nothing written
# ================================================================================================


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    obj = load_raw(path)
    edit(obj)
    torch.save(obj, path)


@pytest.mark.parametrize(
    "case", ["pp_vs_ep", "ambiguous", "missing_rank", "shape", "dtype", "nan", "truncated", "malicious",
             "extra_model_key", "mixed_formats"],
)
def test_bad_input_is_refused(lm_ckpts, tmp_path, case):
    older, newest = it_dir(lm_ckpts / "run_pp2", 100), it_dir(lm_ckpts / "run_pp2", 200)
    rank_file = f"mp_rank_00_001/{MODEL_FILE}"
    key = "decoder.layers.1.self_attention.linear_qkv.weight"
    out = tmp_path / "merged"
    if case == "pp_vs_ep":  # same directory names, different layouts: told apart by args
        ep = it_dir(lm_ckpts / "run_ep2", 100)
        inputs, expect = [ep, newest], [str(ep), "expert_model_parallel_size=2", "pipeline_model_parallel_size=2"]
    elif case == "ambiguous":
        bad = it_dir(lm_ckpts / "no_args", 200)
        inputs = [it_dir(lm_ckpts / "no_args", 100), bad]
        expect = ["mp_rank_00_000/" + MODEL_FILE, "ambiguous", "pipeline_model_parallel_size",
                  "expert_model_parallel_size"]
    elif case == "missing_rank":
        bad = _copy(older, tmp_path / "iter_0000100")
        shutil.rmtree(bad / "mp_rank_00_001")
        inputs, expect = [bad, newest], [str(bad), "missing ['mp_rank_00_001']"]
    elif case in ("shape", "dtype", "nan", "extra_model_key"):
        bad = _copy(older, tmp_path / "iter_0000100")

        def edit(obj):
            if case == "shape":
                obj["model"][key] = torch.zeros(13, 6, dtype=torch.bfloat16)
            elif case == "dtype":
                obj["model"][key] = obj["model"][key].float()
            elif case == "nan":
                obj["model"][key][2, 3] = float("nan")
            else:
                obj["model"]["decoder.layers.1.extra.weight"] = torch.zeros(3)

        _rewrite(bad / rank_file, edit)
        expect = [str(bad / rank_file), f"model/{key}" if case != "extra_model_key" else "extra.weight"]
        expect += {"shape": ["(13, 6)", "(12, 6)"], "dtype": ["torch.float32", "torch.bfloat16"],
                   "nan": ["NaN", "--allow-nonfinite"], "extra_model_key": ["not in the newest input"]}[case]
        inputs = [bad, newest]
    elif case == "truncated":
        bad = _copy(older, tmp_path / "iter_0000100")
        with open(bad / rank_file, "r+b") as f:
            f.truncate((bad / rank_file).stat().st_size - 100)
        inputs, expect = [bad, newest], [str(bad / rank_file), "corrupt or truncated"]
    elif case == "malicious":
        bad = _copy(older, tmp_path / "iter_0000100")
        torch.save({"model": {}, "args": os.system}, bad / rank_file)  # any global outside the allowlist
        inputs, expect = [bad, newest], [str(bad / rank_file), "refusing to unpickle posix.system"]
    elif case == "mixed_formats":
        ds = tmp_path / "global_step5"
        ds.mkdir()
        torch.save({"module": {}}, ds / "mp_rank_00_model_states.pt")
        inputs, expect = [ds, newest], [str(ds), "deepspeed", "torch"]
    code, err = run_cli(["--out", out, *inputs])
    assert code == 1, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    for text in expect:
        assert text in error_lines[0], (text, error_lines[0])
    assert_no_output(out)


def test_verify_catches_a_wrong_merge(lm_ckpts, tmp_path, monkeypatch):
    import megatron_merge.formats.rank_files as rank_files

    real = rank_files.merge_piece
    monkeypatch.setattr(rank_files, "merge_piece", lambda *a, **k: real(*a, **k) * 2)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="verify failed"):
        merge_checkpoints([it_dir(lm_ckpts / "run_ep2", it) for it in ITERATIONS[1:]], out, verify=True)
    assert_no_output(out)


# ================================================================================================
# Memory: bounded by one rank file, not by the checkpoint
# ================================================================================================

_TENSOR_ELEMS = 1 << 21  # 8 MiB of fp32 per rank file
_N_RANKS = 16

# VmHWM is this process's own peak RSS (ru_maxrss would include the forking parent's).
def _write_tp_checkpoint(path: Path, seed: int, tp: int, elems: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for rank in range(tp):
        (path / f"mp_rank_{rank:02d}").mkdir(parents=True)
        torch.save({"args": {"tensor_model_parallel_size": tp}, "iteration": seed,
                    "model": {"decoder.weight": torch.randn(elems // 1024, 1024, generator=gen)}},
                   path / f"mp_rank_{rank:02d}" / MODEL_FILE)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_is_bounded_by_one_rank_file(tmp_path):
    small = [tmp_path / f"small/iter_000000{i}" for i in (1, 2)]
    big = [tmp_path / f"big/iter_000000{i}" for i in (1, 2)]
    for i, path in enumerate(small):
        _write_tp_checkpoint(path, i + 1, tp=2, elems=1024)
    for i, path in enumerate(big):
        _write_tp_checkpoint(path, i + 1, tp=_N_RANKS, elems=_TENSOR_ELEMS)
    file_bytes = _TENSOR_ELEMS * 4
    baseline = peak_rss_of_merge(small, tmp_path / "small_out")
    peak = peak_rss_of_merge(big, tmp_path / "big_out")
    growth = peak - baseline
    # Per file: the merged tensor, accumulator and converted term, and the two memory-mapped
    # inputs' pages -- about 5 files' worth, plus what glibc keeps of freed 8 MiB blocks. One
    # input checkpoint alone is 16 files; holding the model would be far over.
    assert growth < 10 * file_bytes, f"RSS grew {growth / 2**20:.0f} MiB merging 2 x {_N_RANKS} files of 8 MiB"
    rank = f"mp_rank_{_N_RANKS - 1:02d}/{MODEL_FILE}"
    expected = reference([p / rank for p in big], ("model", "decoder.weight"), [0.5, 0.5])
    assert torch.equal(load_raw(tmp_path / "big_out" / rank)["model"]["decoder.weight"], expected)


# ================================================================================================
# Real checkpoints from `pretrain` (checkpoint.format=torch): save, resume, merge, load back
# ================================================================================================

LAYOUTS = {"tp2": ["parallel.tensor_model_parallel_size=2"], "pp2": ["parallel.pipeline_model_parallel_size=2"]}
TORCH_FORMAT = ["checkpoint.format=torch", "merge.enabled=false"]  # in-training merging needs torch_dist
SAVES = (4, 8, 12)


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy_runs")
    runs = {}
    for name, layout in LAYOUTS.items():
        runs[name] = run_pretrain(root / name, 2, ["train.train_iters=12", "checkpoint.save_interval=4",
                                                   *TORCH_FORMAT, *layout])
    return root, runs


@pytest.mark.slow
def test_pretrain_saves_the_legacy_layout_and_resumes_exactly(pretrain_runs, tmp_path):
    root, runs = pretrain_runs
    for name, rank_dirs in (("tp2", ["mp_rank_00", "mp_rank_01"]), ("pp2", ["mp_rank_00_000", "mp_rank_00_001"])):
        assert (root / name / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
        for it in SAVES:
            d = it_dir(root / name, it)
            assert sorted(p.name for p in d.iterdir() if p.is_dir()) == rank_dirs
            sd = torch.load(d / rank_dirs[-1] / MODEL_FILE, weights_only=False)
            assert sd["iteration"] == it and sd["consumed_samples"] == 8 * it
            assert isinstance(sd["args"], dict) and sd["args"]["ckpt_format"] == "torch"
            assert {"model", "optimizer", "opt_param_scheduler", "rng_state"} <= set(sd)
    resumed = run_pretrain(tmp_path / "resumed", 2, ["train.train_iters=12", *TORCH_FORMAT,
                                                     f"checkpoint.load={it_dir(root / 'tp2', 8)}", *LAYOUTS["tp2"]])
    assert resumed.losses == runs["tp2"].losses[8:]  # weights, optimizer, RNG and data position restored


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merged_pretrain_checkpoint_is_bit_exact_and_loads_back(pretrain_runs, tmp_path, layout):
    root, _ = pretrain_runs
    out = tmp_path / "merged"  # not named iter_*: pretrain detects the legacy layout by its contents
    code, err = run_cli(["--method", "ema", "--alpha", "0.3", "--last", "3", "--verify", "--out", out, root / layout])
    assert code == 0, err
    inputs = [it_dir(root / layout, it) for it in SAVES]
    rank_dirs = sorted(p.name for p in inputs[-1].iterdir() if p.is_dir())
    for rank_dir in rank_dirs:
        files = [d / rank_dir / MODEL_FILE for d in inputs]
        merged, newest = load_raw(out / rank_dir / MODEL_FILE), load_raw(files[-1])
        float_keys = [k for k, v in newest["model"].items()
                      if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]
        assert any("linear_qkv.weight" in k for k in float_keys)
        for key in float_keys:
            assert torch.equal(merged["model"][key], reference(files, ("model", key), ema_alpha=0.3)), key
        assert merged["optimizer"]["state"][0]["exp_avg"].equal(newest["optimizer"]["state"][0]["exp_avg"])
    assert (out / "run_config.yaml").read_bytes() == (inputs[-1] / "run_config.yaml").read_bytes()

    if layout == "tp2":
        # Loaded by pretrain and saved again untouched (train_iters = the checkpoint's iteration):
        # the model tensors pretrain holds are exactly the merged ones.
        again = run_pretrain(tmp_path / "again", 2, ["train.train_iters=12", *TORCH_FORMAT,
                                                     f"checkpoint.load={out}", *LAYOUTS[layout]])
        assert "legacy torch format" in again.output
        for rank_dir in rank_dirs:
            saved = load_raw(it_dir(tmp_path / "again", 12) / rank_dir / MODEL_FILE)["model"]
            merged = load_raw(out / rank_dir / MODEL_FILE)["model"]
            for key, value in merged.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(saved[key], value), key
    else:
        # Training continues from the merged weights.
        cont = run_pretrain(tmp_path / "cont", 2, ["train.train_iters=16", *TORCH_FORMAT,
                                                   f"checkpoint.load={out}", *LAYOUTS[layout]])
        assert len(cont.losses) == 4 and all(torch.isfinite(torch.tensor(cont.losses)))
        assert cont.metrics[0]["event"] == "resume"
        # ... and at another layout the legacy format refuses, naming what it needs.
        wrong = run_pretrain(tmp_path / "wrong", 2, ["train.train_iters=16", "merge.enabled=false", f"checkpoint.load={out}",
                                                     *LAYOUTS["tp2"]], check=False)
        assert wrong.returncode != 0 and "do not reshard" in wrong.output


def test_config_refuses_distributed_optimizer_with_the_torch_format():
    from pretrain.config import ConfigError, config_from_dict, validate

    cfg = config_from_dict({}, ["checkpoint.format=torch", "parallel.use_distributed_optimizer=true"])
    with pytest.raises(ConfigError, match="checkpoint.format: torch does not support"):
        validate(cfg, cuda_available=False)
    cfg = config_from_dict({}, ["checkpoint.format=torch", "merge.enabled=true", "merge.interval=2",
                                "checkpoint.save=/tmp/x"])
    with pytest.raises(ConfigError, match="cannot hold the in-training merge state"):
        validate(cfg, cuda_available=False)
