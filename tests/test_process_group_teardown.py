"""``pretrain.platform.process_group_teardown``: every process group is destroyed however the
block ends (return, exception, SIGTERM), so no gloo thread outlives the interpreter's work.

A group left alive at exit makes interpreter finalization abort the process now and then
(``terminate called without an active exception``, SIGABRT) after all its results are written.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from helpers import REPO
from pretrain.platform import process_group_teardown


def _world_of_one(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    dist.new_group([0])  # a second group, as megatron-core and DeepSpeed make them


def test_groups_destroyed_on_return(tmp_path):
    with process_group_teardown():
        _world_of_one(tmp_path)
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_groups_destroyed_on_exception_and_decorated_function(tmp_path):
    @process_group_teardown()
    def worker():
        _world_of_one(tmp_path)
        raise RuntimeError("worker failed")

    with pytest.raises(RuntimeError, match="worker failed"):
        worker()
    assert not dist.is_initialized()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back


def test_sigterm_tears_down_and_exits_143(tmp_path):
    """What torchrun and mp.spawn send to the surviving workers when one fails."""
    script = textwrap.dedent(f"""
        import atexit, sys, time
        import torch.distributed as dist
        from pretrain.platform import process_group_teardown

        atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
        with process_group_teardown():
            dist.init_process_group("gloo", init_method="file://{tmp_path / 'rv'}", rank=0, world_size=1)
            print("ready", flush=True)
            time.sleep(120)
        print("not reached")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "initialized at exit: False" in out
    assert "not reached" not in out
