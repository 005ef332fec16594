"""GPU validation (issue 19): each check one step with its own timeout, then one table.

    bash bench/gpu_check.sh                   # on a CUDA machine (sets the environment up first)
    python bench/gpu_check.py --cpu-dry-run   # here: every step's CPU-side part, no GPU needed

Each step runs as ``python bench/gpu_check.py --step N`` in its own process; on its timeout the
whole process tree (torchrun workers included) is killed and the next step runs. A step prints one
``RESULT {json}`` line: result (pass / fail / skipped / dry-run; local-ok: passed without TE, so its
TE part is not done) and figure; its log is kept in ``--log-dir`` (and, where ``$OUT`` is set, all
logs and the table are written there). The whole run keeps to ``--budget`` seconds: a step that no
longer fits is skipped.

In ``--cpu-dry-run`` a step does what it can without a GPU: the configs it would train are resolved
and validated by ``python -m pretrain --validate-only`` (CUDA-only settings swapped for their CPU
counterparts), the benches answer ``--help``, the NCCL probe runs over gloo, and the merge check
trains the tiny dense config on the CPU and compares in-training and offline merges bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

REPO = Path(__file__).resolve().parents[1]
BENCH, TESTS = REPO / "bench", REPO / "tests"
sys.path[:0] = [str(REPO), str(BENCH), str(TESTS)]

from helpers import run_pretrain  # noqa: E402
from train_bench import GPU_MODEL  # noqa: E402

TINY = {"dense": REPO / "configs" / "tiny-dense.yaml", "moe": REPO / "configs" / "tiny-moe.yaml"}
GPU = ["train.device=cuda", "train.precision=bf16", "model.transformer_impl=transformer_engine"]
SHORT = ["train.train_iters=20", "train.eval_interval=10", "train.eval_iters=2", "checkpoint.save_interval=null",
         "scheduler.warmup_iters=2", "scheduler.wsd_decay_iters=4", "merge.start_iteration=0", "merge.interval=4",
         "merge.save=false", "logging.log_interval=5"]
# 2 ranks on the one GPU: the layouts that need more than one process.
LAYOUTS = {"TP=2": ["parallel.tensor_model_parallel_size=2"], "PP=2": ["parallel.pipeline_model_parallel_size=2"],
           "EP=2": ["parallel.expert_model_parallel_size=2"]}
MERGE_CHECK = ["merge.enabled=true", "merge.method=sma", "merge.interval=4", "merge.window=3",
               "merge.start_iteration=0", "checkpoint.save_interval=4", "train.train_iters=12", "train.eval_interval=12"]
MERGE_ITERATIONS = [4, 8, 12]
# What --cpu-dry-run validates instead of the CUDA-only settings (config validation refuses them on CPUs).
CPU_SWAPS = {"train.device=cuda": "train.device=cpu",
             "model.transformer_impl=transformer_engine": "model.transformer_impl=auto",
             "moe.grouped_gemm=true": "moe.grouped_gemm=false", "merge.storage=device": "merge.storage=host"}


class Step(NamedTuple):
    """One check: its name in the table, the target it is held to, its timeout (s) and its body."""

    name: str
    target: str
    timeout: int
    fn: Callable[[bool, Path], dict]  # (dry run?, work directory) -> result()


def result(res: str, figure: str = "") -> dict:
    return {"result": res, "figure": figure}


@functools.lru_cache(maxsize=None)
def te_version() -> str | None:
    try:  # the extension, not just the Python package
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return None
    return getattr(transformer_engine, "__version__", "?")


def gpu_overrides(dry: bool, extra: list[str] = ()) -> list[str]:
    """GPU settings (+ extra): TE when it imports, else the local spec (and no grouped GEMM, which
    needs TE); in a dry run their CPU counterparts."""
    overrides = [*GPU, *extra]
    if dry:
        return [CPU_SWAPS.get(o, o) for o in overrides]
    if te_version() is None:
        return [{"model.transformer_impl=transformer_engine": "model.transformer_impl=local"}.get(o, o)
                for o in overrides if o != "moe.grouped_gemm=true"]
    return overrides


def verdict(ok: bool, figure: str, dry: bool = False) -> dict:
    """pass / fail; local-ok where the check passed without TE (its TE part not done); dry-run."""
    if dry:
        return result("dry-run" if ok else "fail", figure)
    if ok and te_version() is None:
        return result("local-ok", figure + " (local spec: TE missing)")
    return result("pass" if ok else "fail", figure)


def validate_only(config: Path, overrides: list[str], world_size: int = 1) -> dict:
    """``python -m pretrain --validate-only`` with the given overrides and world size."""
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config), "--validate-only", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": str(world_size), "PYTHONWARNINGS": "ignore"})
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return result("dry-run" if proc.returncode == 0 else "fail", out[-1] if out else f"exit {proc.returncode}")


def train_tiny(kind: str, extra: list[str], dry: bool, work: Path) -> dict:
    overrides = gpu_overrides(dry, [*SHORT, *extra])
    if dry:
        return validate_only(TINY[kind], overrides)
    run = run_pretrain(work / f"tiny-{kind}", 1, overrides, config=TINY[kind], fast=False, timeout=3600)
    first, last = run.losses[0], run.losses[-1]
    merged = [r["val_loss_merged"] for r in run.metrics if "val_loss_merged" in r]
    ok = last < first and bool(merged) and all(x == x for x in merged)  # x == x: not NaN
    return verdict(ok, f"loss {first:.2f} -> {last:.2f}, merged val {merged[-1]:.2f}" if merged
                  else f"loss {first:.2f} -> {last:.2f}, no merged eval")


def step_env(dry: bool, work: Path) -> dict:
    import megatron.core
    import torch

    te = te_version()
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "no CUDA"
    figure = f"torch {torch.__version__}, mcore {megatron.core.__version__}, TE {te or 'missing'}, {gpu}"
    if dry:
        return result("dry-run", figure)
    return result("pass" if cuda and te else "fail", figure)


def step_dense(dry: bool, work: Path) -> dict:
    return train_tiny("dense", [], dry, work)


def step_moe(dry: bool, work: Path) -> dict:
    # The grouped GEMM (TE's GroupedLinear) is the GPU path for experts.
    return train_tiny("moe", ["parallel.expert_model_parallel_size=1", "moe.grouped_gemm=true"], dry, work)


def nccl_probe(backend: str) -> None:
    """Body of the probe (run under torchrun): every rank on device 0, one all-reduce."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    x = torch.ones(4, device=device) * (dist.get_rank() + 1)
    dist.all_reduce(x)
    assert x[0].item() == sum(range(1, dist.get_world_size() + 1))
    dist.destroy_process_group()


def torchrun(nproc: int, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    from helpers import free_port

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(free_port()), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def step_nccl(dry: bool, work: Path) -> dict:
    proc = torchrun(2, str(Path(__file__)), "--nccl-probe", "gloo" if dry else "nccl", timeout=300)
    if proc.returncode == 0:
        (work / "nccl-shares-gpu").touch()  # the layouts step reads it
        return result("dry-run" if dry else "pass", "probe ran over gloo" if dry else "2 ranks share GPU 0")
    reason = next((line for line in reversed(proc.stderr.splitlines()) if "rror" in line), f"exit {proc.returncode}")
    return result("fail" if dry else "skipped", f"NCCL refuses: {reason.strip()[-100:]}")


def train_layout(name: str, dry: bool, work: Path, extra: list[str] = ()) -> bool:
    """Train ``name``'s layout on 2 ranks that share GPU 0 (on the CPU in a dry run); True if the loss fell."""
    kind = "moe" if name.startswith("EP") else "dense"
    run_dir = work / f"layout-{name[:2]}"
    proc = torchrun(2, str(Path(__file__)), "--pretrain-on-gpu0", "--config", str(TINY[kind]),
                    f"checkpoint.save={run_dir}", *gpu_overrides(dry, [*SHORT, *LAYOUTS[name], *extra]))
    metrics = run_dir / "metrics.jsonl"
    ls = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if '"loss"' in line] \
        if metrics.exists() else []
    if proc.returncode != 0 or not ls:
        print(proc.stderr[-3000:])
    return proc.returncode == 0 and len(ls) > 1 and ls[-1] < ls[0]


def step_layouts(dry: bool, work: Path) -> dict:
    if dry:  # validate every layout; train one briefly, to run the shared-GPU launcher here too
        for name, layout in LAYOUTS.items():
            kind = "moe" if name.startswith("EP") else "dense"
            r = validate_only(TINY[kind], gpu_overrides(True, [*SHORT, *layout]), world_size=2)
            if r["result"] == "fail":
                return result("fail", f"{name}: {r['figure']}")
        ok = train_layout("TP=2", True, work, ["train.train_iters=6", "train.eval_interval=null"])
        return result("dry-run" if ok else "fail", f"{' '.join(LAYOUTS)} valid at world size 2; TP=2 trained on CPU")
    if not (work / "nccl-shares-gpu").exists():
        return result("skipped", "needs 2 NCCL ranks on the one GPU (see the NCCL row)")
    figures = [f"{name} {'ok' if train_layout(name, False, work) else 'FAIL'}" for name in LAYOUTS]
    return verdict(all(f.endswith("ok") for f in figures), ", ".join(figures))


def step_mfu(dry: bool, work: Path) -> dict:
    if dry:
        help_ok = subprocess.run([sys.executable, str(BENCH / "train_bench.py"), "--help"], capture_output=True,
                                 timeout=120).returncode == 0
        r = validate_only(TINY["dense"], gpu_overrides(True, [*GPU_MODEL, "train.global_batch_size=4"]))
        return r if r["result"] == "fail" or not help_ok else result("dry-run", "--help ok; " + r["figure"])
    out = work / "train_bench.json"
    # Its output goes to this step's log as it comes (a step killed at its timeout keeps it).
    proc = subprocess.run([sys.executable, str(BENCH / "train_bench.py"), "--gpu", "--iters", "30", "--json", str(out)],
                          cwd=REPO)
    if proc.returncode != 0:
        return result("fail", f"train_bench exit {proc.returncode}")
    f = json.loads(out.read_text())
    if f["mfu"] is None:
        return result("fail", f"{f['tflops_per_gpu']:.0f} TFLOP/s on {f['gpu']} (no peak known)")
    return verdict(f["mfu"] >= 0.45,
                   f"MFU {f['mfu']:.1%} ({f['tflops_per_gpu']:.0f} TFLOP/s, {f['iteration_s'] * 1000:.0f} ms/it)")


def merge_overhead(storage: str, dry: bool, work: Path) -> dict:
    out = work / "online_merge_bench.json"
    if dry:
        from online_merge_bench import GPU_CONFIG, STORAGE, common_overrides

        help_ok = subprocess.run([sys.executable, str(BENCH / "online_merge_bench.py"), "--help"], capture_output=True,
                                 timeout=120).returncode == 0
        r = validate_only(REPO / "configs" / f"{GPU_CONFIG}.yaml",
                          gpu_overrides(True, [*common_overrides(40, 4, gpu=True), *STORAGE[storage]]))
        return r if r["result"] == "fail" or not help_ok else result("dry-run", "--help ok; " + r["figure"])
    if not out.exists():  # one bench run measures both storages
        proc = subprocess.run([sys.executable, str(BENCH / "online_merge_bench.py"), "--gpu", "--iters", "40",
                               "--probe-interval", "4", "--json", str(out)], cwd=REPO)
        if proc.returncode != 0:
            return result("fail", f"online_merge_bench exit {proc.returncode}")
    f = json.loads(out.read_text())[0]["storage"][storage]
    return verdict(f["overhead_v100"] < 0.01, f"{f['overhead_v100']:.3%} at V=100 (snapshot {f['snapshot_s'] * 1000:.1f}"
                   f" ms + next step {f['next_step_extra_s'] * 1000:.1f} ms, step {f['step_s'] * 1000:.0f} ms)")


def step_merge_host(dry: bool, work: Path) -> dict:
    return merge_overhead("host", dry, work)


def step_merge_device(dry: bool, work: Path) -> dict:
    return merge_overhead("device", dry, work)


def merge_run(dry: bool, work: Path) -> Path:
    """One merging run (TE + bf16 on the GPU; tiny dense on the CPU in a dry run), shared by two steps."""
    run_dir = work / "merge-run"
    if not (run_dir / f"iter_{MERGE_ITERATIONS[-1]:07d}").exists():
        overrides = [*MERGE_CHECK, "train.device=cpu"] if dry else gpu_overrides(False, MERGE_CHECK)
        run_pretrain(run_dir, 1, overrides, timeout=3600)
    return run_dir


def step_merge_exact(dry: bool, work: Path) -> dict:
    from test_merge_online import assert_same_model, offline_merge

    run_dir = merge_run(dry, work)
    merged = run_dir / "merged" / f"iter_{MERGE_ITERATIONS[-1]:07d}"
    offline = offline_merge(run_dir, work / "offline-merge", "sma", MERGE_ITERATIONS)
    assert_same_model(merged, offline)
    from merge_reference import model_keys

    return verdict(True, f"{len(model_keys(merged))} tensors equal (sma of {MERGE_ITERATIONS})", dry)


def extra_state(path: Path) -> dict[str, bytes]:
    """Every ``_extra_state`` object of a torch_dist checkpoint as the bytes stored (never unpickled)."""
    from torch.distributed.checkpoint import FileSystemReader

    found = {}
    for index, info in FileSystemReader(str(path)).read_metadata().storage_data.items():
        if "_extra_state" in index.fqn:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                found[index.fqn] = f.read(info.length)
    return found


def step_extra_state(dry: bool, work: Path) -> dict:
    run_dir = merge_run(dry, work)
    newest = run_dir / f"iter_{MERGE_ITERATIONS[-1]:07d}"
    offline = work / "offline-merge"
    if not offline.exists():
        from test_merge_online import offline_merge

        offline_merge(run_dir, offline, "sma", MERGE_ITERATIONS)
    source = extra_state(newest)
    for name, merged in (("offline", offline), ("in-training", run_dir / "merged" / newest.name)):
        if extra_state(merged) != source:
            return result("fail", f"{name} merge: _extra_state differs from the newest checkpoint's ({len(source)})")
    # Load: resume the checkpoint and train 2 more iterations on it.
    resumed = run_pretrain(work / "resumed", 1, [*(["train.device=cpu"] if dry else gpu_overrides(False)),
                                                 f"checkpoint.load={run_dir}", "train.train_iters=14",
                                                 "merge.enabled=false", "checkpoint.save_interval=null"], timeout=3600)
    resumed_from = [r["iteration"] for r in resumed.metrics if "loss" in r][:1]
    ok = bool(source) and resumed_from == [MERGE_ITERATIONS[-1] + 1]
    return verdict(ok, f"{len(source)} _extra_state copied by both merges, resumed to iteration 14", dry)


STEPS = [
    Step("environment", "CUDA + TE import", 120, step_env),
    Step("tiny dense, TE bf16, TP=1", "loss falls", 180, step_dense),
    Step("tiny MoE, TE bf16, grouped GEMM", "loss falls", 180, step_moe),
    Step("NCCL: 2 ranks on 1 GPU", "all-reduce ok", 90, step_nccl),
    Step("TP=2 / PP=2 / EP=2 on 1 GPU", "loss falls", 240, step_layouts),
    Step("MFU ~1.2B dense, TE bf16", ">= 45%", 240, step_mfu),
    Step("merge overhead, storage host", "< 1% at V=100", 300, step_merge_host),
    Step("merge overhead, storage device", "< 1% at V=100", 60, step_merge_device),
    Step("online merge == megatron-merge", "bit for bit", 180, step_merge_exact),
    Step("torch_dist TE ckpt _extra_state", "copied, loads", 120, step_extra_state),
]


def kill_tree(pid: int) -> None:
    """Kill a step and everything it started (torchrun workers run in their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_step(index: int, step: Step, timeout: float, args) -> dict:
    log = args.log_dir / f"{index:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', step.name).strip('-')}.log"
    cmd = [sys.executable, str(Path(__file__)), "--step", str(index), "--work-dir", str(args.work_dir)]
    cmd += ["--cpu-dry-run"] if args.cpu_dry_run else []
    began = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            return {**result("fail", f"timed out after {timeout:.0f} s"), "seconds": time.monotonic() - began}
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    res = json.loads(lines[-1][len("RESULT "):]) if lines else result("fail", f"exit {proc.returncode}, see {log.name}")
    return {**res, "seconds": time.monotonic() - began}


def print_table(rows: list[tuple[str, dict, str]]) -> None:
    """The closing table: check, result, figure, target."""
    widths = [max(len(r[0]) for r in rows), 8, max(len(r[1]["figure"]) for r in rows), max(len(r[2]) for r in rows)]
    head = ("check", "result", "figure", "target")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  time")
    for name, res, target in rows:
        print("  ".join(c.ljust(w) for c, w in zip((name, res["result"], res["figure"], target), widths))
              + f"  {res.get('seconds', 0):.0f} s")


def run_all(args) -> int:
    """Every step (or --only's) in turn within the budget, then the table; 1 if a check failed."""
    shutil.rmtree(args.work_dir, ignore_errors=True)  # idempotent: every run starts afresh
    args.work_dir.mkdir(parents=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    for old in args.log_dir.glob("[0-9][0-9]-*.log"):
        old.unlink()
    start, rows = time.monotonic(), []
    for i, step in enumerate(STEPS, 1):
        if args.only and i not in args.only:
            continue
        left = args.budget - (time.monotonic() - start)
        if left < min(step.timeout, 30):
            res = result("skipped", f"time budget ({args.budget:.0f} s) spent")
        else:
            print(f"[gpu_check] {i}. {step.name} (timeout {min(step.timeout, left):.0f} s)", flush=True)
            res = run_step(i, step, min(step.timeout, left), args)
        print(f"[gpu_check]    {res['result']}: {res['figure']}", flush=True)
        rows.append((f"{i}. {step.name}", res, step.target))
    print()
    print_table(rows)
    print(f"\nlogs: {args.log_dir}  ({time.monotonic() - start:.0f} s in all)")
    table = json.dumps([{"check": n, **r, "target": t} for n, r, t in rows], indent=1)
    if args.json:
        args.json.write_text(table)
    if os.environ.get("OUT"):  # the device tool brings back $OUT (a few files): the table and every log
        out = Path(os.environ["OUT"])
        (out / "gpu_check.json").write_text(table)
        with (out / "gpu_check_logs.txt").open("w") as f:
            for log in sorted(args.log_dir.glob("*.log")):
                f.write(f"===== {log.name}\n{log.read_text()[-200_000:]}\n")
    # local-ok (TE not checked) and fail count as failures; skipped (NCCL, budget) does not.
    return 0 if all(r["result"] in ("pass", "dry-run", "skipped") for _, r, _ in rows) else 1


def run_one_step(args) -> int:
    """--step N: one check in this process; its RESULT line is what run_step reads."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        res = STEPS[args.step - 1].fn(args.cpu_dry_run, args.work_dir)
    except Exception as exc:  # a failing check is a table row, not a crash
        traceback.print_exc()
        res = result("fail", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every step's CPU-side part only")
    parser.add_argument("--budget", type=float, help="seconds for all steps together (480; 1800 in a dry run)")
    parser.add_argument("--only", nargs="+", type=int, help="run only these step numbers (1-based)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/gpu_check_logs"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gpu_check_work"))
    parser.add_argument("--json", type=Path, help="also write the table to this JSON file")
    parser.add_argument("--step", type=int, help=argparse.SUPPRESS)  # internal: run one step in this process
    args = parser.parse_args(argv)
    args.budget = args.budget or (1800 if args.cpu_dry_run else 480)
    return run_all(args) if args.step is None else run_one_step(args)


def pretrain_on_gpu0() -> int:
    """``python -m pretrain`` for a rank that shares GPU 0 with the others (torchrun's LOCAL_RANK would
    pick a GPU this machine lacks)."""
    import runpy

    os.environ["LOCAL_RANK"] = "0"
    sys.argv = ["pretrain", *sys.argv[2:]]
    runpy.run_module("pretrain", run_name="__main__")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--nccl-probe"]:
        nccl_probe(sys.argv[2])
        sys.exit(0)
    if sys.argv[1:2] == ["--pretrain-on-gpu0"]:
        sys.exit(pretrain_on_gpu0())
    sys.exit(main())
