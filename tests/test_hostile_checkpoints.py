"""Hostile and damaged checkpoints: no code runs from any part of one, every bad input is refused.

Real checkpoints are saved once per module by ``pretrain`` (torch_dist and legacy ``torch``, one
rank, two iterations); copies are then tampered with. A payload is an object whose ``__reduce__``
would create a marker file when unpickled (never a shell command); each kind names a different
callable (``io.open``, ``posix.mkdir``, ``builtins.exec``, ``builtins.eval``, ``_pickle.loads``
of a nested payload). Payloads go into each pickled part of each format -- DCP ``.metadata``,
bytes items (RNG state, ``_extra_state``), ``common.pt``, legacy ``model_optim_rng.pt``,
DeepSpeed ``*_model_states.pt`` -- and each is given to each entry point: ``megatron-merge``
(in process), ``checkpoint.load_checkpoint`` (a resume) and ``pretrain.evaluate`` (one
subprocess for all cases, tests/scripts/hostile_loads.py). Every time: the marker never appears,
the entry point fails with one ``error:`` line naming the file (and the key and class where the
part has them), nothing is written and no model weight changes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_cli, run_pretrain

from megatron_merge.safe_load import read_dcp_metadata

RUN_OVERRIDES = ["model.num_layers=2", "train.global_batch_size=4", "train.train_iters=2", "scheduler.warmup_iters=1",
                 "scheduler.wsd_decay_iters=1",
                 "checkpoint.save_interval=1"]


# ------------------------------------------------------------------------------------------------
# Payloads
# ------------------------------------------------------------------------------------------------


class OpenPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class MkdirPayload(OpenPayload):
    def __reduce__(self):
        return os.mkdir, (self.marker,)


class ExecPayload(OpenPayload):
    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class EvalPayload(OpenPayload):
    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


class NestedPayload(OpenPayload):
    def __reduce__(self):  # an unpickler inside the pickle, to smuggle the inner payload
        return pickle.loads, (pickle.dumps(OpenPayload(self.marker)),)


PAYLOADS = {"io.open": OpenPayload, "posix.mkdir": MkdirPayload, "builtins.exec": ExecPayload,
            "builtins.eval": EvalPayload, "_pickle.loads": NestedPayload}


# ------------------------------------------------------------------------------------------------
# Checkpoints and how each part is tampered with
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``dist/`` (torch_dist) and ``legacy/`` (torch format) runs of pretrain, iterations 1 and 2."""
    root = tmp_path_factory.mktemp("hostile_src")
    run_pretrain(root / "dist", 1, RUN_OVERRIDES)
    run_pretrain(root / "legacy", 1, [*RUN_OVERRIDES, "checkpoint.format=torch"])
    return root


def it_dir(run: Path, iteration: int) -> Path:
    return run / f"iter_{iteration:07d}"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bytes_keys(directory: Path) -> list[str]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(directory)
    return [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def replace_bytes_item(directory: Path, key: str, obj) -> None:
    """Store ``torch.save(obj)`` as bytes item ``key`` (appended to its file, .metadata repointed)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = read_dcp_metadata(directory)
    index = MetadataIndex(key)
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path = directory / info.relative_path
    offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(buffer.getvalue())
    metadata.storage_data[index] = type(info)(info.relative_path, offset, len(buffer.getvalue()))
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def tamper_metadata(directory: Path, payload) -> tuple[Path, str | None]:
    metadata = read_dcp_metadata(directory)
    metadata.mcore_data = {"planner": payload}  # an attribute megatron-core itself adds
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return directory / ".metadata", "mcore_data.planner"


def tamper_rng(directory: Path, payload) -> tuple[Path, str | None]:
    key = next(k for k in _bytes_keys(directory) if k.startswith("rng_state"))
    replace_bytes_item(directory, key, [{"random": payload}])
    return _file_of(directory, key), key


def tamper_extra_state(directory: Path, payload) -> tuple[Path, str | None]:
    key = next(k for k in _bytes_keys(directory) if "_extra_state" in k)
    replace_bytes_item(directory, key, [payload])
    return _file_of(directory, key), key


def tamper_common(directory: Path, payload) -> tuple[Path, str | None]:
    from megatron_merge.safe_load import load_torch

    common = load_torch(directory / "common.pt")
    common["args"] = argparse.Namespace(exit_signal=payload)  # where Megatron-LM keeps its args
    torch.save(common, directory / "common.pt")
    return directory / "common.pt", "args.exit_signal"


def tamper_legacy(directory: Path, payload) -> tuple[Path, str | None]:
    from megatron_merge.safe_load import load_torch

    path = directory / "mp_rank_00" / "model_optim_rng.pt"
    state = load_torch(path)
    state["rng_state"][0]["np_rng_state"] = payload
    torch.save(state, path)
    return path, "rng_state.0.np_rng_state"


def _file_of(directory: Path, key: str) -> Path:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return directory / read_dcp_metadata(directory).storage_data[MetadataIndex(key)].relative_path


TORCH_DIST_PARTS = {"metadata": tamper_metadata, "rng_state": tamper_rng,
                    "extra_state": tamper_extra_state, "common": tamper_common}
PARTS = {**TORCH_DIST_PARTS, "legacy_model_optim_rng": tamper_legacy}


def deepspeed_tag(path: Path, step: int, extra: dict | None = None) -> Path:
    """A ZeRO-0 DeepSpeed tag directory as ``engine.save_checkpoint`` lays it out (one rank)."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(step)
    module = {"layer.weight": torch.randn(4, 3, generator=gen), "layer.bias": torch.randn(4, generator=gen)}
    state = {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
             "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
             "lr_scheduler": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
             "global_steps": step, "global_samples": step * 4, "dp_world_size": 1, "mp_world_size": 1,
             "ds_config": {"train_batch_size": 4}, "ds_version": "0.16.0", **(extra or {})}
    torch.save(state, path / "mp_rank_00_model_states.pt")
    return path


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------



def short_name(kind: str) -> str:
    """The callable's name: torch names ``_pickle.loads`` ``pickle.loads``."""
    return kind.rsplit(".", 1)[-1]


def single_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"


# ------------------------------------------------------------------------------------------------
# The payloads are live: an unrestricted load runs them (so their absence below means something)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_run_under_an_unrestricted_load(tmp_path, kind):
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save([PAYLOADS[kind](marker)], buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)  # what DCP's DefaultLoadPlanner.load_bytes does
    assert marker.exists()


# ------------------------------------------------------------------------------------------------
# megatron-merge
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("part", PARTS)
def test_merge_refuses_every_payload_in_every_part(saved, tmp_path, part, kind):
    run = saved / ("legacy" if part.startswith("legacy") else "dist")
    marker = tmp_path / "marker"
    older = copy_run(it_dir(run, 1), tmp_path / "in" / "iter_0000001")
    newest = copy_run(it_dir(run, 2), tmp_path / "in" / "iter_0000002")
    path, key = PARTS[part](newest, PAYLOADS[kind](marker))
    out = tmp_path / "merged"
    code, err = run_cli(["--out", out, older, newest])
    assert not marker.exists(), f"payload ran ({part}, {kind})"
    assert code == 1, err
    line = single_error_line(err)
    assert str(path) in line and f"refusing to" in line and short_name(kind) in line, line
    assert key in line, line
    assert_no_output(out)


@pytest.mark.parametrize("part", ["metadata", "common"])
def test_merge_refuses_a_payload_in_an_older_input(saved, tmp_path, part):
    marker = tmp_path / "marker"
    older = copy_run(it_dir(saved / "dist", 1), tmp_path / "in" / "iter_0000001")
    path, _ = PARTS[part](older, OpenPayload(marker))
    out = tmp_path / "merged"
    code, err = run_cli(["--out", out, older, it_dir(saved / "dist", 2)])
    assert not marker.exists()
    assert code == 1 and str(path) in single_error_line(err), err
    assert_no_output(out)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_merge_refuses_payloads_in_deepspeed_files(tmp_path, kind):
    marker = tmp_path / "marker"
    older = deepspeed_tag(tmp_path / "ds" / "global_step1", 1)
    newest = deepspeed_tag(tmp_path / "ds" / "global_step2", 2, {"client_state": PAYLOADS[kind](marker)})
    out = tmp_path / "merged"
    code, err = run_cli(["--out", out, older, newest])
    assert not marker.exists()
    assert code == 1, err
    line = single_error_line(err)
    assert str(newest / "mp_rank_00_model_states.pt") in line and short_name(kind) in line, line
    assert "client_state" in line, line
    assert_no_output(out)


def test_trust_inputs_copies_opaque_parts_unread_and_says_so(saved, tmp_path):
    """--trust-inputs is the explicit opt-out: the unparsed item is copied and merge.json says so."""
    newest = copy_run(it_dir(saved / "dist", 2), tmp_path / "in" / "iter_0000002")
    key = next(k for k in _bytes_keys(newest) if "_extra_state" in k)
    replace_bytes_item(newest, key, [io.BytesIO(b"opaque")])  # harmless, but unparsed
    out = tmp_path / "merged"
    code, err = run_cli(["--trust-inputs", "--out", out, it_dir(saved / "dist", 1), newest])
    assert code == 0, err
    assert json.loads((out / "merge.json").read_text())["trust_inputs"] is True
    code, err = run_cli(["--out", tmp_path / "merged2", it_dir(saved / "dist", 1), newest])
    assert code == 0, err
    assert json.loads((tmp_path / "merged2" / "merge.json").read_text())["trust_inputs"] is False


# ------------------------------------------------------------------------------------------------
# Damaged inputs the merge used to accept
# ------------------------------------------------------------------------------------------------


def test_merge_refuses_a_garbage_common_pt_in_the_newest_input(saved, tmp_path):
    newest = copy_run(it_dir(saved / "dist", 2), tmp_path / "in" / "iter_0000002")
    (newest / "common.pt").write_bytes(b"\x00garbage" * 10)
    out = tmp_path / "merged"
    code, err = run_cli(["--out", out, it_dir(saved / "dist", 1), newest])
    assert code == 1 and str(newest / "common.pt") in single_error_line(err), err
    assert_no_output(out)


def test_merge_refuses_a_truncated_distcp_even_where_it_only_holds_copied_state(saved, tmp_path):
    """The older input's optimizer state is never read (it comes from the newest), yet a file cut
    inside it is refused: every input is checked against its own metadata."""
    older = copy_run(it_dir(saved / "dist", 1), tmp_path / "in" / "iter_0000001")
    metadata = read_dcp_metadata(older)
    last = {}
    for index, info in metadata.storage_data.items():
        if info.relative_path not in last or info.offset > last[info.relative_path][1].offset:
            last[info.relative_path] = (index, info)
    index, info = next((i, s) for i, s in last.values() if i.fqn.startswith("optimizer."))
    with open(older / info.relative_path, "r+b") as f:
        f.truncate(info.offset + info.length - 1)
    out = tmp_path / "merged"
    code, err = run_cli(["--out", out, older, it_dir(saved / "dist", 2)])
    line = single_error_line(err)
    assert code == 1 and str(older / info.relative_path) in line and "truncated" in line, line
    assert_no_output(out)


def test_megatron_lm_args_in_common_pt_merge_with_model_only(saved, tmp_path):
    """Megatron-LM's args hold megatron-core enums and signal.Signals: allowed by megatron-core's own
    safe-globals list, which a fresh megatron-merge process imports only when a file needs it."""
    script = (
        "import argparse, signal, sys, torch\n"
        "from megatron.core.enums import ModelType\n"
        "from megatron.core.transformer.enums import AttnBackend\n"
        "from megatron_merge.safe_load import load_torch\n"
        "for d in sys.argv[1:]:\n"
        "    c = load_torch(d + '/common.pt')\n"
        "    c['args'] = argparse.Namespace(attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,\n"
        "                                   exit_signal=signal.SIGTERM)\n"
        "    torch.save(c, d + '/common.pt')\n"
    )
    inputs = [copy_run(it_dir(saved / "dist", i), tmp_path / "in" / f"iter_000000{i}") for i in (1, 2)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-c", script, *map(str, inputs)], check=True, env=env, cwd=REPO, timeout=120)
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "megatron_merge", "--model-only", "--no-progress", "--out", str(out),
                           *map(str, inputs)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "common.pt").is_file()


# ------------------------------------------------------------------------------------------------
# checkpoint.load_checkpoint (resume) and pretrain.evaluate
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_loads(saved, tmp_path_factory):
    """Every part of both formats tampered with (io.open payloads) plus a clean control, loaded by
    the resume path and by pretrain.evaluate in one subprocess; returns its results and markers."""
    root = tmp_path_factory.mktemp("hostile_pretrain")
    cases, expected = [], {}
    for part, tamper in PARTS.items():
        run = saved / ("legacy" if part.startswith("legacy") else "dist")
        directory = copy_run(it_dir(run, 2), root / part / "iter_0000002")
        marker = root / f"{part}.marker"
        path, key = tamper(directory, OpenPayload(marker))
        cases.append({"name": part, "path": str(directory)})
        expected[part] = (path, key, marker)
    garbage = copy_run(it_dir(saved / "dist", 2), root / "garbage_common" / "iter_0000002")
    (garbage / "common.pt").write_bytes(b"not a torch file")
    cases.append({"name": "garbage_common", "path": str(garbage)})
    cases.append({"name": "clean", "path": str(it_dir(saved / "dist", 2))})
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "hostile_loads.py"), str(saved / "dist"),
         str(root / "cases.json"), str(root / "results.json")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((root / "results.json").read_text()), expected, garbage


@pytest.mark.parametrize("part", PARTS)
def test_resume_refuses_every_part_before_changing_the_model(pretrain_loads, part):
    results, expected, _ = pretrain_loads
    path, key, marker = expected[part]
    resume = results[part]["resume"]
    assert not marker.exists(), f"payload ran on resume/evaluate ({part})"
    assert resume["raised"] == "CheckpointError", resume
    assert str(path) in resume["message"] and "io.open" in resume["message"], resume
    assert key in resume["message"], resume
    assert not resume["weights_changed"], "the model changed before the refusal"


@pytest.mark.parametrize("part", PARTS)
def test_evaluate_never_runs_a_payload(pretrain_loads, part):
    results, expected, _ = pretrain_loads
    path, _, marker = expected[part]
    evaluate = results[part]["evaluate"]
    assert not marker.exists()
    # evaluate loads weights only, yet a hostile RNG item is refused too: every object is parsed
    assert evaluate["code"] != 0, evaluate
    line = single_error_line(evaluate["stderr"])
    assert str(path) in line and "io.open" in line, line


def test_garbage_common_pt_is_an_error_line_for_resume_and_evaluate(pretrain_loads):
    results, _, garbage = pretrain_loads
    assert results["garbage_common"]["resume"]["raised"] == "CheckpointError"
    assert str(garbage / "common.pt") in results["garbage_common"]["resume"]["message"]
    line = single_error_line(results["garbage_common"]["evaluate"]["stderr"])
    assert str(garbage / "common.pt") in line, line


def test_clean_checkpoint_still_resumes_and_evaluates(pretrain_loads):
    results, _, _ = pretrain_loads
    assert results["clean"]["resume"]["raised"] is None, results["clean"]
    assert results["clean"]["resume"]["weights_changed"], "loading iteration 2 should set the weights"
    assert results["clean"]["evaluate"]["code"] == 0, results["clean"]


def test_merge_refuses_a_deepspeed_rank_file_missing_from_every_input(tmp_path):
    """The stored mp_world_size says two model-parallel ranks; both inputs lack rank 1's file."""
    inputs = [deepspeed_tag(tmp_path / "ds" / f"global_step{s}", s, {"mp_world_size": 2}) for s in (1, 2)]
    out = tmp_path / "merged"
    code, err = run_cli(["--out", out, *inputs])
    line = single_error_line(err)
    assert code == 1 and "mp_rank_01_model_states.pt: missing" in line and "mp_world_size=2" in line, line
    assert_no_output(out)


# ------------------------------------------------------------------------------------------------
# OS errors and extra state
# ------------------------------------------------------------------------------------------------

_FILE_SIZE_LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from megatron_merge.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_merge_out_of_space_is_an_error_line_and_leaves_nothing(saved, tmp_path):
    """A write that fails part way (a file-size limit stands in for a full disk: same code path,
    EFBIG instead of ENOSPC) ends in one error line naming the file, and no output."""
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMITED_CLI, "20000", "--no-progress", "--out", str(out),
         str(it_dir(saved / "dist", 1)), str(it_dir(saved / "dist", 2))],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    line = single_error_line(proc.stderr)
    assert str(out) in line and "file too large" in line, line
    assert_no_output(out)


def test_merge_output_under_a_file_is_an_error_line(saved, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "merged"
    code, err = run_cli(["--out", out, it_dir(saved / "dist", 1), it_dir(saved / "dist", 2)])
    line = single_error_line(err)
    assert code == 1 and str(tmp_path / "afile") in line and "not a directory" in line, line


def test_a_float_extra_state_tensor_is_copied_not_averaged(tmp_path):
    import torch.distributed.checkpoint as dcp

    from megatron_merge.offline import merge_checkpoints

    key = "decoder.layers.0.self_attention.linear_qkv._extra_state"
    inputs = []
    for i in (1, 2):
        path = tmp_path / f"iter_000000{i}"
        dcp.save({"decoder.layers.0.weight": torch.full((4,), float(i)), key: torch.full((3,), float(i))},
                 checkpoint_id=str(path), no_dist=True)
        (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                        "common_backend": "torch", "common_backend_version": 1}))
        torch.save({"iteration": i}, path / "common.pt")
        inputs.append(path)
    result = merge_checkpoints(inputs, tmp_path / "merged")
    assert key in result.plan.format_plan.copied_keys and key not in result.plan.format_plan.merged_keys
    state = {"decoder.layers.0.weight": torch.empty(4), key: torch.empty(3)}
    dcp.load(state, checkpoint_id=str(tmp_path / "merged"), no_dist=True)
    assert torch.equal(state[key], torch.full((3,), 2.0))  # the newest input's
    assert torch.equal(state["decoder.layers.0.weight"], torch.full((4,), 1.5))


def test_plain_data_objects_of_real_checkpoints_load(tmp_path):
    """The reader refuses code, not data: Transformer Engine's extra state as an empty or a full
    BytesIO, Megatron's args, numpy RNG state all come back as they were saved."""
    import numpy as np

    from megatron_merge.safe_load import load_torch

    saved = [io.BytesIO(), io.BytesIO(b"fp8 meta"), argparse.Namespace(lr=1e-3), np.random.get_state()]
    torch.save(saved, tmp_path / "objects.pt")
    empty, full, args, rng = load_torch(tmp_path / "objects.pt")
    assert empty.getvalue() == b"" and full.getvalue() == b"fp8 meta" and args.lr == 1e-3
    assert np.array_equal(rng[1], saved[3][1])
