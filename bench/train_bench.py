"""Training speed: iteration time and tokens/s per parallel layout, and MFU on GPUs.

Prints figures; asserts nothing. Every layout runs in this one invocation, so the ratios compare
like with like on the same machine.

    python bench/train_bench.py                  # CPU: tiny-dense at DP=2, TP=2, PP=2 (2 processes)
    python bench/train_bench.py --iters 60
    python bench/train_bench.py --gpu            # GPUs present: a ~1.2B dense GPT, TE, bf16, MFU
    python bench/train_bench.py --gpu --json out.json   # the figures also as JSON (bench/gpu_check.py)

MFU = achieved model FLOP/s / peak bf16 FLOP/s, with FLOPs per token = 6 * parameters
+ 12 * layers * hidden * seq_length (attention), the convention of the PaLM and Megatron papers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import free_port  # noqa: E402

CPU_LAYOUTS = {
    "DP=2": [],
    "TP=2": ["parallel.tensor_model_parallel_size=2"],
    "PP=2": ["parallel.pipeline_model_parallel_size=2"],
    "DP=2 + dist. optimizer": ["parallel.use_distributed_optimizer=true"],
}

# ~1.2B parameters: 24 x 2048, SwiGLU 5632, 32k vocabulary (byte tokenizer padded; the embedding
# shape only matters for the parameter count we report).
GPU_MODEL = [
    "model.num_layers=24", "model.hidden_size=2048", "model.num_attention_heads=16",
    "model.ffn_hidden_size=5632", "train.seq_length=2048", "train.micro_batch_size=4",
    "train.precision=bf16", "model.make_vocab_size_divisible_by=32768",
    # Training alone: no in-training merging, and no ~17 GB checkpoint at the end.
    "merge.enabled=false", "checkpoint.save=null",
]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def run(nproc: int, overrides: list[str], iters: int, run_dir: Path) -> list[dict]:
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), "-m", "pretrain", "--config", str(REPO / "configs" / "tiny-dense.yaml"),
        f"train.train_iters={iters}", "train.eval_interval=null", "checkpoint.save_interval=null",
        f"checkpoint.save={run_dir}", f"logging.metrics_file={run_dir / 'metrics.jsonl'}",
        "scheduler.warmup_iters=1", "scheduler.wsd_decay_iters=1", *overrides,
    ]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={"PYTHONWARNINGS": "ignore",
                                                                                 **__import__("os").environ})
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(overrides)}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def summarize(records: list[dict], warmup: int) -> tuple[float, float]:
    steady = records[warmup:]
    return (statistics.median(r["iteration_time_s"] for r in steady),
            statistics.median(r["tokens_per_s"] for r in steady))


def cpu_bench(iters: int) -> None:
    import torch

    print(f"tiny-dense on {torch.get_num_threads()} threads x 2 processes (gloo), {iters} iterations, "
          f"median over iterations {iters // 4 + 1}..{iters}")
    print(f"{'layout':<26}{'iteration (ms)':>16}{'tokens/s':>12}{'vs DP=2':>10}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CPU_LAYOUTS.items():
            t, tps = summarize(run(2, overrides, iters, Path(tmp) / name.replace(" ", "_")), iters // 4)
            base = base or tps
            print(f"{name:<26}{t * 1000:>16.1f}{tps:>12.0f}{tps / base:>10.2f}")


def gpu_bench(iters: int, json_path: Path | None = None) -> None:
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("--gpu needs CUDA")
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    layers, hidden, ffn, seq, vocab = 24, 2048, 5632, 2048, 32768
    params = layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + 2 * vocab * hidden
    flops_per_token = 6 * params + 12 * layers * hidden * seq
    overrides = GPU_MODEL + [f"train.global_batch_size={4 * gpus}"]
    with tempfile.TemporaryDirectory() as tmp:
        t, tps = summarize(run(gpus, overrides, iters, Path(tmp) / "gpu"), iters // 4)
    achieved = tps * flops_per_token / gpus / 1e12
    print(f"{gpus} x {name}: {params / 1e9:.2f}B params, {t * 1000:.0f} ms/iteration, {tps:.0f} tokens/s, "
          f"{achieved:.0f} TFLOP/s per GPU" + (f", MFU {achieved / peak:.1%}" if peak else ""))
    if json_path is not None:
        json_path.write_text(json.dumps({"gpus": gpus, "gpu": name, "params": params, "iteration_s": t,
                                         "tokens_per_s": tps, "tflops_per_gpu": achieved,
                                         "mfu": achieved / peak if peak else None}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--gpu", action="store_true", help="MFU of a ~1.2B dense GPT on the GPUs present")
    parser.add_argument("--json", type=Path, help="with --gpu: also write the figures to this JSON file")
    args = parser.parse_args()
    gpu_bench(args.iters, args.json) if args.gpu else cpu_bench(args.iters)
