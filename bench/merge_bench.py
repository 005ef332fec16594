"""Offline merge against the machine's I/O floor and the naive way (a benchmark, not a test).

    python bench/merge_bench.py                      # 3 synthetic bf16 inputs, 6 GiB in all
    python bench/merge_bench.py --quick              # 3 x ~110 MiB (about a minute, mostly
                                                     # writing the inputs; --dir reuses them)
    python bench/merge_bench.py --inputs 4 --total-gib 12 --workers 1 2 --repeat 3
    python bench/merge_bench.py --real RUN_DIR --last 3
    python bench/merge_bench.py --total-gib 3 --workers 1 --ranks 1 2 4 --skip-naive

One invocation measures, on the same inputs:

``floor``  plain sequential file I/O: read every input ``.distcp`` file front to back in 16 MiB
           chunks into one reused buffer, then write one file the size of one input's
           ``.distcp`` files and fsync it. Our merge fsyncs every file it writes (plus
           ``.metadata`` and the directory), so the floor fsyncs too. No parsing, no arithmetic.
``ours``   ``megatron_merge.offline.merge_checkpoints`` (SMA), once per ``--workers`` count, and
           once per ``--ranks`` count as ``torchrun --nproc-per-node R -m megatron_merge`` (the
           work items spread over R gloo ranks; its time is the merge's own, as rank 0 logs it:
           from planning to publishing, interpreter start and imports excluded like the others;
           the launch's whole wall time is in its JSON line as ``launch_seconds``).
``naive``  what users do today: ``dist_checkpointing.load_plain_tensors`` on each input (in a
           gloo world of 1), ``acc += w_i * x_i.float()`` in memory for every float tensor,
           cast back to the source dtype, ``torch.save`` of the plain state dict to one file,
           fsynced. Its memory is the fp32 accumulator plus one loaded checkpoint.

Each measurement runs in a fresh subprocess, so memory does not leak between them. Reported:
wall time of the work (interpreter start and imports excluded), throughput as the inputs'
``.distcp`` bytes per wall second (one numerator for all, so throughput ratios are time
ratios), CPU seconds (user + system, workers included), bytes actually read (``ours`` reads
optimizer state of the newest input only, which matters with ``--real``), and peak RSS:
``VmHWM``, or with ``--workers > 1`` the sampled peak of the process and its workers; the
growth column is over the process's RSS after its imports (torch alone is ~350 MiB). Before
each measurement the page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``,
needs root) so every method reads from disk; without that permission every input is read
once first and all methods read warm. The 1-minute load average is recorded: on a shared
host, wall times vary by 2x from run to run, so compare ratios from one invocation and use
``--repeat`` (methods interleaved, medians reported).

Synthetic inputs are written by megatron-core's own ``dist_checkpointing.save`` from 2 spawned
gloo ranks at TP=2 (GPT-shaped: embedding and output layer, qkv/fc1 split by rows, proj/fc2
by columns, replicated norms, an RNG object and a TE-style extra state): 4 ``.distcp`` files
per checkpoint (2 ranks x 2 writer threads), as a real TP=2 save lays them out. ``--dir``
keeps them for the next run. Prints one JSON line per measurement, a table, and a JSON
summary with the ratios and the issue's targets (within 1.3x of the floor's time; at least 2x
faster and 5x less peak memory than the naive way, on checkpoints of several GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB, MIB = 2**30, 2**20
READ_BLOCK = 16 * MIB
WORLD_SIZE = 2
SPEC_FILE = "bench_spec.json"
TARGETS = {"ours_over_floor_time": 1.3, "naive_over_ours_time": 2.0, "naive_over_ours_peak_rss": 5.0}


# ============================================================================================
# Synthetic checkpoints: a GPT-shaped model saved by megatron-core at TP=2 on 2 gloo ranks
# ============================================================================================


def model_layout(bytes_per_checkpoint: int, itemsize: int) -> dict[str, tuple[tuple, int | None]]:
    """Global shape and TP split dim (None: replicated) of each tensor of a GPT of about the
    requested size: embedding and output layer of ``16 * hidden`` rows, then as many
    transformer layers (qkv, proj, fc1, fc2, two norms) as fill the rest."""
    hidden = 2048
    while True:
        vocab = 16 * hidden
        embeddings = 2 * vocab * hidden * itemsize
        per_layer = 12 * hidden * hidden * itemsize
        layers = round((bytes_per_checkpoint - embeddings) / per_layer)
        if layers >= 2 or hidden <= 256:
            break
        hidden //= 2
    layout = {"embedding.word_embeddings.weight": ((vocab, hidden), 0)}
    for i in range(max(1, layers)):
        p = f"decoder.layers.{i}."
        layout[p + "self_attention.linear_qkv.layer_norm_weight"] = ((hidden,), None)
        layout[p + "self_attention.linear_qkv.weight"] = ((3 * hidden, hidden), 0)
        layout[p + "self_attention.linear_proj.weight"] = ((hidden, hidden), 1)
        layout[p + "mlp.linear_fc1.layer_norm_weight"] = ((hidden,), None)
        layout[p + "mlp.linear_fc1.weight"] = ((4 * hidden, hidden), 0)
        layout[p + "mlp.linear_fc2.weight"] = ((hidden, 4 * hidden), 1)
    layout["decoder.final_layernorm.weight"] = ((hidden,), None)
    layout["output_layer.weight"] = ((vocab, hidden), 0)
    return layout


def _rank_state_dict(layout, dtype, rank: int, seed: int) -> dict:
    """This rank's sharded state dict: its TP=2 slice of every tensor (random values)."""
    import torch
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    state = {}
    for key, (shape, split_dim) in layout.items():
        local_shape = list(shape)
        if split_dim is not None:
            local_shape[split_dim] //= WORLD_SIZE
        local = torch.empty(local_shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        if split_dim is None:
            state[key] = ShardedTensor.from_rank_offsets(key, local, replica_id=rank)
        else:
            state[key] = ShardedTensor.from_rank_offsets(key, local, (split_dim, rank, WORLD_SIZE))
    state["rng_state"] = ShardedObject(
        "rng_state", {"rank": rank, "seed": seed}, (WORLD_SIZE,), (rank,)
    )
    extra = "decoder.layers.0.self_attention.linear_qkv._extra_state"
    state["extra_state"] = ShardedObject(extra, b"te-extra-%d" % seed, (1,), (0,), replica_id=rank)
    state["iteration"] = seed
    state["args"] = {"tensor_model_parallel_size": WORLD_SIZE}
    return state


def _save_rank(rank: int, port: int, jobs: list, dtype_name: str) -> None:
    """One spawned gloo rank: ``dist_checkpointing.save`` every checkpoint in ``jobs``."""
    from pretrain.platform import process_group_teardown

    with process_group_teardown():
        _save_checkpoints(rank, port, jobs, dtype_name)


def _save_checkpoints(rank: int, port: int, jobs: list, dtype_name: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    # megatron-core 0.16.1's torch_dist save calls torch.cuda.synchronize() and
    # torch.cuda.current_device(), which mean nothing on a CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core import dist_checkpointing

    dtype = getattr(torch, dtype_name)
    for path, seed, bytes_per_checkpoint in jobs:
        layout = model_layout(bytes_per_checkpoint, dtype.itemsize)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(_rank_state_dict(layout, dtype, rank, seed), path)
        dist.barrier()


def write_synthetic(root: Path, inputs: int, total_bytes: int, dtype: str) -> list[Path]:
    """Write (or reuse, if ``root`` holds the same spec) ``inputs`` synthetic checkpoints."""
    spec = {"inputs": inputs, "total_bytes": total_bytes, "dtype": dtype, "version": 1}
    paths = [root / f"iter_{1000 * (i + 1):07d}" for i in range(inputs)]
    spec_path = root / SPEC_FILE
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        log(f"reusing synthetic checkpoints in {root}")
        return paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    spec_path.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), 1000 * (i + 1), total_bytes // inputs) for i, p in enumerate(paths)]
    started = time.perf_counter()
    # In a fresh interpreter: megatron-core's save patches and its memory stay out of this one.
    spec_arg = json.dumps({"jobs": jobs, "dtype": dtype})
    subprocess.run([sys.executable, __file__, "--_generate", spec_arg], check=True)
    spec_path.write_text(json.dumps(spec))
    log(f"wrote {inputs} synthetic checkpoints in {time.perf_counter() - started:.0f} s")
    return paths


def _generate_main(spec: dict) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_save_rank, args=(port, spec["jobs"], spec["dtype"]), nprocs=WORLD_SIZE)


# ============================================================================================
# The three methods, each measured in a fresh subprocess
# ============================================================================================


def distcp_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.distcp"))


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in distcp_files(checkpoint))


def run_floor(inputs: list[Path], out: Path) -> dict:
    """Read every input .distcp file sequentially, write one input's worth, fsync."""
    started = time.perf_counter()
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    read = 0
    for checkpoint in inputs:
        for file in distcp_files(checkpoint):
            with open(file, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    read += n
    read_seconds = time.perf_counter() - started
    to_write = checkpoint_bytes(inputs[-1])
    with open(out, "wb", buffering=0) as f:
        left = to_write
        while left:
            left -= f.write(view[: min(left, READ_BLOCK)])
        os.fsync(f.fileno())
    return {"bytes_read": read, "bytes_written": to_write, "read_seconds": read_seconds,
            "write_seconds": time.perf_counter() - started - read_seconds}


def run_ours(inputs: list[Path], out: Path, workers: int) -> dict:
    from megatron_merge.offline import merge_checkpoints

    result = merge_checkpoints(inputs, out, "sma", workers=workers)
    return {"bytes_read": result.plan.bytes_to_read, "bytes_written": result.plan.bytes_to_write}


def run_naive(inputs: list[Path], out: Path) -> dict:
    """load_plain_tensors per input, fp32 running average in memory, torch.save, fsync."""
    import torch
    from megatron.core import dist_checkpointing

    weight = 1.0 / len(inputs)
    acc: dict = {}
    for checkpoint in inputs:
        state = dist_checkpointing.load_plain_tensors(str(checkpoint))
        for key, value in state.items():
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                acc[key] = value  # newest wins
            elif key not in acc:
                acc[key] = (value.float() * weight, value.dtype)
            else:
                acc[key][0].add_(value.float() * weight)
        del state
    merged = {k: v[0].to(v[1]) if isinstance(v, tuple) else v for k, v in acc.items()}
    del acc
    with open(out, "wb") as f:
        torch.save(merged, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes_read": sum(checkpoint_bytes(c) for c in inputs), "bytes_written": out.stat().st_size}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    import resource

    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class TreePeakRss:
    """Peak of this process's RSS plus its children's, sampled every 20 ms (for workers > 1,
    whose memory VmHWM of this process does not see)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = self.process.memory_info().rss
            for child in self.process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except Exception:  # noqa: BLE001 - a worker that just exited
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _init_single_process_group(out: Path) -> None:
    """A gloo world of 1: megatron-core's load asks torch.distributed for its rank."""
    import torch.distributed as dist

    rendezvous = out.with_name(out.name + ".rendezvous")
    rendezvous.unlink(missing_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)


def _measure_main(spec: dict) -> None:
    """In a fresh subprocess: run one method, print its measurement as the last line."""
    inputs, out, method = [Path(p) for p in spec["inputs"]], Path(spec["out"]), spec["method"]
    workers = spec.get("workers", 1)
    if method != "floor":  # import outside the timed region, as a long-lived tool would
        import torch  # noqa: F401
        from megatron.core import dist_checkpointing  # noqa: F401

        import megatron_merge.offline  # noqa: F401
    if method == "naive":
        _init_single_process_group(out)
    baseline = _status_kib("VmRSS")
    tree = TreePeakRss() if workers > 1 else None
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    if tree:
        tree.__enter__()
    try:
        if method == "floor":
            io_bytes = run_floor(inputs, out)
        elif method == "ours":
            io_bytes = run_ours(inputs, out, workers)
        else:
            io_bytes = run_naive(inputs, out)
    finally:
        if tree:
            tree.__exit__(None, None, None)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    peak = max(_status_kib("VmHWM"), tree.peak if tree else 0)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak,
                      "baseline_rss": baseline, "loadavg_1m": os.getloadavg()[0], **io_bytes}))


def drop_page_cache() -> bool:
    """sync + drop clean page cache, so the next run reads from disk; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm_page_cache(inputs: list[Path]) -> None:
    buffer = memoryview(bytearray(READ_BLOCK))
    for checkpoint in inputs:
        for file in checkpoint.iterdir():
            if file.is_file():
                with open(file, "rb", buffering=0) as f:
                    while f.readinto(buffer):
                        pass


def measure_ranks(inputs: list[Path], scratch: Path, cold: bool, ranks: int) -> dict:
    """``torchrun --nproc-per-node ranks -m megatron_merge``: the merge's time as rank 0 logs it,
    the launch's wall time, CPU of every process, and the sampled peak RSS of all ranks."""
    import re
    import resource

    import psutil

    out = scratch / f"out_ranks{ranks}"
    if cold:
        drop_page_cache()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "megatron_merge",
               "--workers", "1", "--no-progress", "--out", str(out), *map(str, inputs)]
    cpu_before = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))
    started = time.perf_counter()
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    tree = psutil.Process(launcher.pid)
    while launcher.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, stderr = launcher.communicate()
    launch_seconds = time.perf_counter() - started
    cpu = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime")) - cpu_before
    try:
        found = re.search(r"merged \d+ checkpoints into .* in ([0-9.]+) s", stderr)
        if launcher.returncode != 0 or not found:
            raise SystemExit(f"torchrun with {ranks} ranks failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
        bytes_read = sum(checkpoint_bytes(c) for c in inputs)
        return {"seconds": float(found.group(1)), "launch_seconds": launch_seconds, "cpu_seconds": cpu,
                "peak_rss": peak, "baseline_rss": None, "loadavg_1m": os.getloadavg()[0],
                "bytes_read": bytes_read, "bytes_written": checkpoint_bytes(inputs[-1])}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(method: str, inputs: list[Path], scratch: Path, cold: bool, workers: int = 1) -> dict:
    """Run one method in a fresh interpreter; return its measurement (``ranks``: under torchrun
    with ``workers`` ranks)."""
    if method == "ranks":
        return measure_ranks(inputs, scratch, cold, workers)
    out = scratch / f"out_{method}_w{workers}"
    if cold:
        drop_page_cache()
    spec = {"method": method, "inputs": [str(p) for p in inputs], "out": str(out), "workers": workers}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--_measure", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    try:
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        out.with_name(out.name + ".rendezvous").unlink(missing_ok=True)
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink(missing_ok=True)


# ============================================================================================
# Reporting
# ============================================================================================


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Table columns: header, width, format of the value.
COLUMNS = [
    ("method", 26, "{}"), ("wall s", 8, "{:.2f}"), ("GiB/s", 7, "{:.3f}"), ("CPU s", 7, "{:.1f}"),
    ("read GiB", 9, "{:.2f}"), ("peak RSS MiB", 13, "{:.0f}"), ("(+ growth)", 11, "{:+.0f}"),
    ("x floor", 8, "{:.2f}"), ("naive/this", 11, "{:.2f}"), ("naive/this", 11, "{:.1f}"),
]


def _table_line(cells: list[str]) -> str:
    return "".join(
        f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
        for i, (cell, (_, width, _)) in enumerate(zip(cells, COLUMNS))
    )


def print_table(rows: list[dict], input_bytes: int) -> None:
    """One line per method: its medians, and its ratios to the floor and to the naive way."""
    floor = next(r for r in rows if r["name"] == "floor")
    naive = next((r for r in rows if r["name"] == "naive"), None)
    print(_table_line([name for name, _, _ in COLUMNS]))
    print(_table_line([""] * 7 + ["(time)", "(time)", "(peak RSS)"]))
    for r in rows:
        values = [
            r["name"], r["seconds"], input_bytes / GIB / r["seconds"], r["cpu_seconds"],
            r["bytes_read"] / GIB, r["peak_rss"] / MIB,
            None if r["baseline_rss"] is None else (r["peak_rss"] - r["baseline_rss"]) / MIB,  # all ranks: no baseline
            r["seconds"] / floor["seconds"],
            naive["seconds"] / r["seconds"] if naive else None,
            naive["peak_rss"] / r["peak_rss"] if naive else None,
        ]
        print(_table_line([
            "-" if value is None else fmt.format(value) for value, (_, _, fmt) in zip(values, COLUMNS)
        ]))


def summarize(rows: list[dict], **context) -> dict:
    """Each of our configurations' ratios to the floor and the naive way, checked against the
    targets one configuration at a time (a faster worker count may cost the memory target), and
    the best configuration: the fastest that meets every target, else the fastest."""
    floor = next(r for r in rows if r["name"] == "floor")
    naive = next((r for r in rows if r["name"] == "naive"), None)
    configurations = {}
    for r in sorted((r for r in rows if r["name"].startswith("ours")), key=lambda r: r["seconds"]):
        ratios = {"ours_over_floor_time": round(r["seconds"] / floor["seconds"], 3)}
        met = {"within_1.3x_floor_time":
               ratios["ours_over_floor_time"] <= TARGETS["ours_over_floor_time"]}
        if naive:
            ratios["naive_over_ours_time"] = round(naive["seconds"] / r["seconds"], 3)
            ratios["naive_over_ours_peak_rss"] = round(naive["peak_rss"] / r["peak_rss"], 2)
            met["2x_faster_than_naive"] = (
                ratios["naive_over_ours_time"] >= TARGETS["naive_over_ours_time"])
            met["5x_less_peak_rss_than_naive"] = (
                ratios["naive_over_ours_peak_rss"] >= TARGETS["naive_over_ours_peak_rss"])
        configurations[r["name"]] = {**ratios, "targets_met": met}
    best = next((name for name, c in configurations.items() if all(c["targets_met"].values())),
                next(iter(configurations)))
    return {"summary": True, **context, "best_ours": best, **configurations[best],
            "configurations": configurations}


def medians(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per method: median time, CPU time and load over its runs, the highest peak RSS."""
    rows = []
    for name, results in runs.items():
        row = dict(results[0], name=name)
        for field in ("seconds", "cpu_seconds", "loadavg_1m"):
            row[field] = statistics.median(r[field] for r in results)
        row["peak_rss"] = max(r["peak_rss"] for r in results)
        rows.append(row)
    return rows


# ============================================================================================
# Main
# ============================================================================================


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", type=int, default=3, help="synthetic checkpoints to merge")
    parser.add_argument("--total-gib", type=float, default=6.0,
                        help="synthetic .distcp bytes across all inputs (default 6: 3 x 2 GiB; "
                        "the naive way holds ~3.5x one checkpoint in memory)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="synthetic parameter dtype (default: bfloat16, as bf16 training saves)")
    parser.add_argument("--quick", action="store_true", help="3 inputs of ~110 MiB, 1 worker")
    parser.add_argument("--real", metavar="RUN_DIR", help="merge real checkpoints of a pretrain run")
    parser.add_argument("--last", type=int, default=3, help="with --real: the newest N checkpoints")
    parser.add_argument("--workers", type=int, nargs="+",
                        help="our merge's worker counts (default: 1 2; with --quick: 1)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[],
                        help="also merge under torchrun with each of these rank counts")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per method, interleaved; medians are reported")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive way")
    parser.add_argument("--warm", action="store_true",
                        help="read warm even where the page cache can be dropped")
    parser.add_argument("--dir", help="scratch directory; synthetic inputs kept there for reuse "
                        "(default: a temporary one, removed at the end)")
    parser.add_argument("--_generate", help=argparse.SUPPRESS)
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.inputs, args.total_gib = 3, 0.3
    if args.workers is None:
        args.workers = [1] if args.quick else [1, 2]
    return args


def run_all(methods: list[tuple[str, str, int]], inputs: list[Path], scratch: Path, cold: bool,
            repeat: int) -> dict[str, list[dict]]:
    """Measure every (name, method, workers) ``repeat`` times, interleaved so that drift on a
    shared host hits every method alike; print a JSON line per measurement."""
    input_bytes = sum(checkpoint_bytes(c) for c in inputs)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in methods}
    for run in range(1, repeat + 1):
        for name, method, workers in methods:
            log(f"[{run}/{repeat}] {name} ...")
            result = measure(method, inputs, scratch, cold, workers)
            runs[name].append(result)
            rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
            print(json.dumps({"method": name, "run": run, "input_bytes": input_bytes,
                              "read_gib_per_s": round(input_bytes / GIB / result["seconds"], 3),
                              **rounded}), flush=True)
    return runs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._generate:
        return _generate_main(json.loads(args._generate))
    if args._measure:
        from pretrain.platform import process_group_teardown

        with process_group_teardown():  # the naive method starts a world of one
            return _measure_main(json.loads(args._measure))

    root = Path(args.dir or tempfile.mkdtemp(prefix="merge_bench_"))
    scratch = root / "outputs"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if args.real:
            from megatron_merge.selection import select_from_run

            inputs = [ref.path for ref in select_from_run(args.real, last=args.last)]
        else:
            total = int(args.total_gib * GIB)
            inputs = write_synthetic(root / "inputs", args.inputs, total, args.dtype)
        input_bytes = sum(checkpoint_bytes(c) for c in inputs)

        cold = not args.warm and drop_page_cache()
        if not cold:
            warm_page_cache(inputs)
        methods = [("floor", "floor", 1)]
        methods += [(f"ours ({w} worker{'s' * (w > 1)})", "ours", w) for w in args.workers]
        methods += [(f"ours (torchrun {r} rank{'s' * (r > 1)})", "ranks", r) for r in args.ranks]
        if not args.skip_naive:
            methods.append(("naive", "naive", 1))
        rows = medians(run_all(methods, inputs, scratch, cold, args.repeat))

        cache = "dropped before each run (cold reads)" if cold else "warm (inputs read once first)"
        load = statistics.mean(r["loadavg_1m"] for r in rows)
        print(f"\n{len(inputs)} checkpoints, {input_bytes / GIB:.2f} GiB of .distcp input in all; "
              f"page cache {cache}; median of {args.repeat} run(s); mean 1-min load average "
              f"{load:.1f} on {os.cpu_count()} CPUs")
        print_table(rows, input_bytes)
        print()
        print(json.dumps(summarize(rows, checkpoints=len(inputs), input_bytes=input_bytes,
                                   cache=cache, repeat=args.repeat,
                                   mean_loadavg_1m=round(load, 2))))
    finally:
        shutil.rmtree(scratch if args.dir else root, ignore_errors=True)


if __name__ == "__main__":
    main()
