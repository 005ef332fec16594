"""Run pretrain under torchrun, failing inside the second checkpoint save (a simulated crash).

Usage: torchrun --nproc-per-node 2 tests/scripts/crash_during_save.py CONFIG [overrides...]
"""

import os
import sys

from megatron.core import dist_checkpointing

from pretrain.config import load_config, validate
from pretrain.platform import process_group_teardown
from pretrain.train import pretrain

if __name__ == "__main__":
    real_save = dist_checkpointing.save
    calls = {"n": 0}

    def save_then_crash(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            # Some of the files exist when the process dies.
            open(os.path.join(checkpoint_dir, f"__{os.environ['RANK']}_0.distcp"), "wb").write(b"partial")
            raise SystemExit(17)
        return real_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    dist_checkpointing.save = save_then_crash
    cfg = load_config(sys.argv[1], sys.argv[2:])
    validate(cfg, world_size=int(os.environ["WORLD_SIZE"]))
    with process_group_teardown():
        pretrain(cfg)
