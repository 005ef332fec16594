"""Shared test utilities: launching real torchrun jobs of ``python -m pretrain``, and measuring
the peak memory of a ``megatron-merge`` run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TINY_DENSE = REPO / "configs" / "tiny-dense.yaml"

# A smaller, faster shape than configs/tiny-dense.yaml for multi-process tests.
FAST = (
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "train.seq_length=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.eval_iters=2",
    "train.eval_interval=null",
    "scheduler.warmup_iters=2",
    "scheduler.wsd_decay_iters=4",
    "optimizer.lr=3e-3",
    "logging.log_interval=5",
    "checkpoint.save_interval=null",
    "merge.enabled=false",  # tests that merge turn it on with their own settings
    "merge.start_iteration=0",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path

    @property
    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.metrics if "loss" in r]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(r["iteration"], r["val_loss"]) for r in self.metrics if "val_loss" in r]


def run_pretrain(run_dir: Path, nproc: int, overrides: Sequence[str] = (), config: Path = TINY_DENSE,
                 fast: bool = True, timeout: int = 600, check: bool = True, env: Optional[dict] = None) -> Run:
    """Launch ``torchrun --nproc-per-node nproc -m pretrain`` and return its exit code, output and metrics."""
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), "-m", "pretrain", "--config", str(config),
        *(FAST if fast else ()), f"checkpoint.save={run_dir}", *overrides,
    ]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    run = Run(proc.returncode, proc.stdout + proc.stderr, Path(run_dir))
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{run.output[-6000:]}")
    return run


def run_module(module: str, *args: str, env: Optional[dict] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` with the repo on the path."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# Runs the megatron-merge CLI in a fresh interpreter and prints its peak resident memory.
_PEAK_RSS_SCRIPT = """
import re, sys
from megatron_merge.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print("PEAK_RSS_KB", re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
sys.exit(code)
"""


def peak_rss_of_merge(inputs, out) -> int:
    """Peak RSS in bytes (Linux VmHWM) of ``megatron-merge --out out inputs...`` in its own process."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, "--no-progress", "--out", str(out), *map(str, inputs)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split("PEAK_RSS_KB")[1].split()[0]) * 1024


def run_cli(args) -> tuple[int, str]:
    """``megatron-merge args --no-progress`` in this process: (exit code, stderr text)."""
    import contextlib
    import io

    from megatron_merge import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main([*map(str, args), "--no-progress"])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


# ------------------------------------------------------------------------------------------------
# One merge, every way of running it
# ------------------------------------------------------------------------------------------------

MERGE_WAYS = ("one_process", "two_workers", "torchrun_2x2")


def torchrun_merge(args: Sequence, nodes: int = 2, procs_per_node: int = 2,
                   timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``megatron-merge args`` under torchrun: ``nodes`` launchers on this host (simulated
    nodes, static rendezvous), ``procs_per_node`` ranks each. Returns each launcher's result."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
             "--nproc-per-node", str(procs_per_node), "--node-rank", str(node),
             "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "megatron_merge", *map(str, args), "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )
        for node in range(nodes)
    ]
    results = []
    for launcher in launchers:
        try:
            out, err = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            launcher.kill()
            out, err = launcher.communicate()
        results.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err))
    return results


def merge_every_way(args: Sequence, root: Path) -> dict[str, Path]:
    """The same ``megatron-merge`` (``args`` without ``--out``) run in one process, with
    ``--workers 2``, and under torchrun on 2 simulated nodes x 2 ranks; way -> output.

    Each writes ``root/out`` (so the paths recorded inside are equal) and is moved aside.
    """
    outputs = {}
    for way in MERGE_WAYS:
        out = root / "out"
        if way == "torchrun_2x2":
            launches = torchrun_merge([*args, "--out", out])
            for launch in launches:
                assert launch.returncode == 0, launch.stderr[-3000:]
        else:
            workers = "1" if way == "one_process" else "2"
            code, err = run_cli([*args, "--workers", workers, "--out", out])
            assert code == 0, err
        outputs[way] = out.rename(root / way)
    return outputs


def assert_same_bytes(a: Path, b: Path) -> None:
    """Two output directories hold the same files with the same bytes (``merge.json``: the
    same content but for its creation time)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for name in files_a:
        if name.name == "merge.json":
            record_a, record_b = (json.loads((d / name).read_text()) for d in (a, b))
            record_a.pop("created"), record_b.pop("created")
            assert record_a == record_b, name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"
