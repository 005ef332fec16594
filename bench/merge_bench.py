"""Offline merge throughput and memory on synthetic torch_dist checkpoints (a benchmark, not a test).

    python bench/merge_bench.py --inputs 3 --chunks 64 --chunk-mib 16 --workers 1 2

Writes N synthetic DCP checkpoints (torch's own saver plus megatron-core's metadata.json and
common.pt) of ``chunks`` fp32 tensors of ``chunk-mib`` each, merges them with each worker count,
and prints one JSON line per run: seconds, bytes read/written, MiB/s, and the peak RSS growth of
the merging process and its workers over the baseline (sampled every 10 ms; with --workers > 1
it includes each spawned worker's own Python + torch footprint, ~300 MiB).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil
import torch
import torch.distributed.checkpoint as dcp

from megatron_merge.offline import merge_checkpoints


def write_checkpoint(path: Path, seed: int, chunks: int, chunk_elems: int, one_file: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = {
        f"decoder.layers.{i}.mlp.linear_fc1.weight": torch.randn(
            chunk_elems // 1024, 1024, generator=gen
        )
        for i in range(chunks)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = dcp.FileSystemWriter(str(path), single_file_per_rank=one_file)
        dcp.save(state, storage_writer=writer, no_dist=True)
    (path / "metadata.json").write_text(json.dumps({
        "sharded_backend": "torch_dist", "sharded_backend_version": 1,
        "common_backend": "torch", "common_backend_version": 1,
    }))
    torch.save({"iteration": seed}, path / "common.pt")


class PeakRss:
    """Samples this process's RSS (plus its children's) in a background thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.process = psutil.Process()

    def _rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def __enter__(self):
        self.baseline = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--chunk-mib", type=float, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="sma")
    parser.add_argument("--one-file", action="store_true",
                        help="store all chunks in one .distcp file (default: one file per chunk, "
                        "so --workers has files to split)")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="merge_bench_"))
    chunk_elems = int(args.chunk_mib * 2**20 / 4) // 1024 * 1024
    inputs = [root / f"iter_{i + 1:07d}" for i in range(args.inputs)]
    for i, path in enumerate(inputs):
        if not path.exists():
            # In a child process, so the memory it takes does not blur this process's baseline.
            writer = multiprocessing.get_context("spawn").Process(
                target=write_checkpoint, args=(path, i + 1, args.chunks, chunk_elems, args.one_file)
            )
            writer.start()
            writer.join()
            if writer.exitcode != 0:
                raise SystemExit(f"writing {path} failed")
    try:
        for workers in args.workers:
            out = root / f"merged_w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            with PeakRss() as rss:
                result = merge_checkpoints(inputs, out, args.method, workers=workers)
            read, written = result.plan.bytes_to_read, result.plan.bytes_to_write
            print(json.dumps({
                "workers": workers, "inputs": args.inputs, "chunks": args.chunks,
                "chunk_mib": args.chunk_mib, "seconds": round(result.seconds, 3),
                "read_mib": round(read / 2**20, 1), "written_mib": round(written / 2**20, 1),
                "read_mib_per_s": round(read / 2**20 / result.seconds, 1),
                "peak_rss_growth_mib": round((rss.peak - rss.baseline) / 2**20, 1),
                "projected_peak_per_worker_mib": round(result.plan.peak_bytes_per_worker / 2**20, 1),
            }))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
