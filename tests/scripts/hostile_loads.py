"""Load tampered checkpoints through pretrain's entry points in one process (one gloo rank).

    python tests/scripts/hostile_loads.py RUN_DIR CASES.json RESULT.json

``RUN_DIR`` is a saved run (its ``run_config.yaml`` builds the model); ``CASES.json`` lists
``{"name", "path"}``. For each case: ``checkpoint.load_checkpoint`` with optimizer and RNG (a
resume) into a model built once, recording whether it raised, the message, and whether any
model weight changed; then ``pretrain.evaluate.main`` on it, recording its exit code and stderr.
Used by tests/test_hostile_checkpoints.py, which checks that no payload ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path


def main() -> int:
    run_dir, cases_file, result_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    cases = json.loads(cases_file.read_text())
    from pretrain import checkpoint as ckpt
    from pretrain import evaluate, train
    from pretrain.batches import build_training_data
    from pretrain.config import load_config
    from pretrain.model import build_model
    from pretrain.platform import init_distributed

    newest = sorted(run_dir.glob("iter_*"))[-1]
    cfg = load_config(str(newest / ckpt.CONFIG_FILE), [])
    platform = init_distributed(cfg)
    data = build_training_data(cfg, platform)
    model = train.wrap_with_ddp(cfg, build_model(cfg, platform, data.vocab_size))
    optimizer = train.build_optimizer(cfg, model)
    scheduler = train.build_scheduler(cfg, optimizer)
    results = {}
    for case in cases:
        before = [p.detach().clone() for chunk in model for p in chunk.parameters()]
        try:
            ckpt.load_checkpoint(cfg, model, optimizer, scheduler, case["path"])
            resume = {"raised": None, "message": ""}
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            resume = {"raised": type(exc).__name__, "message": str(exc)}
        after = [p.detach() for chunk in model for p in chunk.parameters()]
        resume["weights_changed"] = any(not b.equal(a) for b, a in zip(before, after))
        results[case["name"]] = {"resume": resume}
    for case in cases:  # after the resumes: a successful evaluate tears the process group down
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = evaluate.main(["--checkpoints", case["path"]])
            except SystemExit as exc:
                code = exc.code
            except Exception as exc:  # noqa: BLE001 - a traceback instead of an error line
                code = -1
                err.write(f"uncaught {type(exc).__name__}: {exc}")
        results[case["name"]]["evaluate"] = {"code": code, "stderr": err.getvalue()}
    Path(result_file).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":  # checkpoint loading may start worker processes
    sys.exit(main())
