"""Faults survived: kill -9 a training run again and again, restart it with the same command, and
check that it ends exactly where an uninterrupted run ends (a benchmark; prints figures).

For each checkpoint format it runs, side by side on this machine, an uninterrupted reference run
and a run that is killed ``--kills`` times (SIGKILL to the launcher and every worker, by pid),
half of the kills the moment a checkpoint save is under way (an ``*.incomplete`` directory
exists), the others at a random point. After every kill it checks that the tracker names a
complete checkpoint (or none yet), then relaunches the same command, which auto-resumes. At the
end the metrics must hold each iteration exactly once with the reference run's losses, bit for
bit. The LR is constant so that a run's losses do not depend on where it was restarted.

    python bench/fault_bench.py                     # 10 kills each for torch_dist (merging on) and torch
    python bench/fault_bench.py --kills 2 --formats torch_dist --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import FAST, TINY_DENSE, free_port  # noqa: E402

MERGE = ("merge.enabled=true", "merge.interval=2", "merge.window=3", "merge.eval=false")


def command(run_dir: Path, fmt: str, iters: int) -> list[str]:
    extra = MERGE if fmt == "torch_dist" else ()  # the legacy format holds no merge state
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(free_port()), "-m", "pretrain", "--config", str(TINY_DENSE), *FAST, f"checkpoint.save={run_dir}",
            f"checkpoint.format={fmt}", "scheduler.style=constant", f"train.train_iters={iters}",
            "checkpoint.save_interval=2", "checkpoint.keep_last=3", *extra]


def kill_tree(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each in its own session)."""
    try:
        root = psutil.Process(launcher.pid)
        root.suspend()  # no worker can be started between listing the children and killing them
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.wait()


def saving(run_dir: Path) -> bool:
    return any(run_dir.glob("iter_*.incomplete")) or any(run_dir.glob("merged/iter_*.incomplete"))


def started(run_dir: Path, since: float) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and path.stat().st_mtime > since


def newest_iteration(run_dir: Path) -> int:
    """The newest iteration the metrics file records (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    newest = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # being written
            continue
        if "loss" in record:
            newest = max(newest, record["iteration"])
    return newest


def tracker_is_complete(run_dir: Path) -> bool:
    from pretrain.checkpoint import is_complete, iteration_dir, read_tracker

    iteration = read_tracker(run_dir)
    return iteration is None or is_complete(iteration_dir(run_dir, iteration))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["iteration"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def launch(cmd: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=log,
                            stderr=subprocess.STDOUT)


def killed_run(run_dir: Path, fmt: str, iters: int, kills: int, rng: random.Random, log) -> dict:
    """Kill, check, relaunch until the run finishes; what happened."""
    events = {"kills": 0, "during_save": 0, "launches": 0, "tracker_complete_after_every_kill": True}
    while True:
        began = time.time()
        launcher = launch(command(run_dir, fmt, iters), log)
        events["launches"] += 1
        if events["kills"] < kills:
            during_save = events["kills"] % 2 == 0
            done = newest_iteration(run_dir)
            target = rng.randint(done + 1, max(done + 1, iters - 1))  # a random iteration still to run
            while launcher.poll() is None:
                if started(run_dir, began):
                    if during_save and saving(run_dir):
                        break
                    if not during_save and newest_iteration(run_dir) >= target:
                        time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside the next iteration
                        break
                time.sleep(0.005)
            if launcher.poll() is None:
                kill_tree(launcher)
                events["kills"] += 1
                events["during_save"] += int(during_save)
                events["tracker_complete_after_every_kill"] &= tracker_is_complete(run_dir)
                continue
        if launcher.wait() != 0:
            raise SystemExit(f"{fmt}: a relaunch failed (exit {launcher.returncode}); see the log")
        return events


def bench(fmt: str, iters: int, kills: int, seed: int, tmp: Path) -> dict:
    with (tmp / f"{fmt}.log").open("w") as log:
        reference = tmp / f"{fmt}-reference"
        if subprocess.run(command(reference, fmt, iters), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode != 0:
            raise SystemExit(f"{fmt}: the reference run failed; see {tmp / f'{fmt}.log'}")
        began = time.perf_counter()
        events = killed_run(tmp / f"{fmt}-killed", fmt, iters, kills, random.Random(seed), log)
        events["seconds"] = round(time.perf_counter() - began, 1)
    got, want = losses(tmp / f"{fmt}-killed"), losses(reference)
    leftovers = sorted(str(p.relative_to(tmp)) for p in (tmp / f"{fmt}-killed").rglob("*.incomplete"))
    return {"format": fmt, "iterations": iters, **events,
            "each_iteration_once": [i for i, _ in got] == list(range(1, iters + 1)),
            "losses_equal_uninterrupted": got == want, "leftover_incomplete": leftovers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--formats", nargs="+", default=["torch_dist", "torch"], choices=["torch_dist", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line per format only")
    args = parser.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory(prefix="fault_bench_") as tmp:
        for fmt in args.formats:
            result = bench(fmt, args.iters, args.kills, args.seed, Path(tmp))
            ok &= result["losses_equal_uninterrupted"] and result["each_iteration_once"] and \
                result["tracker_complete_after_every_kill"]
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"{fmt}: {result['kills']} kills ({result['during_save']} during a save) over "
                      f"{result['launches']} launches in {result['seconds']} s; tracker complete after every "
                      f"kill: {result['tracker_complete_after_every_kill']}; each iteration once: "
                      f"{result['each_iteration_once']}; losses equal the uninterrupted run's: "
                      f"{result['losses_equal_uninterrupted']}; leftover *.incomplete: "
                      f"{result['leftover_incomplete'] or 'none'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
