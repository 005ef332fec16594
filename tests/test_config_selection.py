"""One merge selection (merge, checkpoint.init_merge, recovery.merge) and one optimizer-state choice
(checkpoint.resume_optimizer, checkpoint.init_optimizer, recovery.optimizer): shared validation,
and the keys they replaced still read, with a deprecation warning."""

import typing
import warnings

import pytest
import yaml

from megatron_merge.weights import METHODS
from pretrain.config import (
    CheckpointConfig,
    ConfigError,
    MergeMethod,
    MergeSelection,
    OptimizerState,
    RecoveryConfig,
    RunConfig,
    config_from_dict,
    load_config,
    reference_markdown,
    to_dict,
    validation_errors,
)

# Old overrides -> the new ones they mean (non-default values, so each old key warns).
EQUIVALENT = {
    "no_load_optim": (["checkpoint.no_load_optim=true"], ["checkpoint.resume_optimizer=fresh"]),
    "recovery_optimizer": (["recovery.optimizer=keep"], ["recovery.optimizer=checkpoint"]),
    "init_merge_last": (
        ["checkpoint.init_merge_method=ema", "checkpoint.init_merge_last=4", "checkpoint.init_merge_every=2",
         "checkpoint.init_merge_alpha=0.5"],
        ["checkpoint.init_merge.enabled=true", "checkpoint.init_merge.method=ema", "checkpoint.init_merge.window=4",
         "checkpoint.init_merge.every=2", "checkpoint.init_merge.ema_alpha=0.5"]),
    "init_merge_iterations": (
        ["checkpoint.init_merge_method=wma", "checkpoint.init_merge_iterations=[4, 8, 12]"],
        ["checkpoint.init_merge.enabled=true", "checkpoint.init_merge.method=wma",
         "checkpoint.init_merge.iterations=[4, 8, 12]"]),
    "recovery_merge": (["recovery.window=2", "recovery.method=ema", "recovery.ema_alpha=0.3"],
                       ["recovery.merge.window=2", "recovery.merge.method=ema", "recovery.merge.ema_alpha=0.3"]),
}


@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_old_keys_resolve_to_the_new_ones_with_a_warning(name):
    old, new = EQUIVALENT[name]
    with pytest.warns(DeprecationWarning) as caught:
        from_old = config_from_dict({}, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_new = config_from_dict({}, new)
    assert to_dict(from_old) == to_dict(from_new)
    assert to_dict(from_old) != to_dict(RunConfig())
    messages = [str(w.message) for w in caught]
    for override in old:  # each old key is named, with what to write instead
        key = override.split("=")[0]
        assert any(m.startswith(key) and "is deprecated: use " in m for m in messages), messages
    assert all(any(n.split("=")[0] in m for n in new) for m in messages), messages


def test_old_keys_in_a_yaml_file(tmp_path):
    """The README's recovery example and PMA-init flags as they shipped."""
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({
        "checkpoint": {"no_load_optim": True, "init_from": str(tmp_path), "init_merge_method": "sma",
                       "init_merge_last": 5},
        "recovery": {"enabled": True, "window": 4, "optimizer": "keep", "skip_data": False}}))
    with pytest.warns(DeprecationWarning, match=r"checkpoint.init_merge_method is deprecated: use "
                                                r"checkpoint.init_merge.enabled=true checkpoint.init_merge.method=sma"):
        cfg = load_config(path)
    c, r = cfg.checkpoint, cfg.recovery
    assert c.resume_optimizer == "fresh" and (c.init_merge.enabled, c.init_merge.method, c.init_merge.window) == (
        True, "sma", 5)
    assert (r.merge.window, r.optimizer, r.skip_data) == (4, "checkpoint", False)


def test_a_run_config_saved_before_the_change_loads_silently():
    """Saved run configs hold every key at its value; the old defaults mean the new defaults."""
    saved = to_dict(RunConfig())
    c, r = saved["checkpoint"], saved["recovery"]
    del c["resume_optimizer"], c["init_merge"], r["merge"]
    c.update(no_load_optim=False, init_merge_method=None, init_merge_last=3, init_merge_every=1,
             init_merge_iterations=[], init_merge_alpha=0.2)
    r.update(window=3, method="sma", ema_alpha=0.2, optimizer="reset")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_dict(saved) == RunConfig()
        new = to_dict(RunConfig())  # and the new form round-trips
        assert config_from_dict(new) == RunConfig()


def test_an_override_wins_also_under_the_old_name():
    with pytest.warns(DeprecationWarning):
        cfg = config_from_dict({"checkpoint": {"init_merge": {"window": 5}}, "recovery": {"optimizer": "checkpoint"}},
                               ["checkpoint.init_merge_last=7", "recovery.optimizer=reset"])
    assert cfg.checkpoint.init_merge.window == 7 and cfg.recovery.optimizer == "fresh"


def test_an_old_key_with_a_value_outside_its_vocabulary():
    with pytest.raises(ConfigError, match=r"checkpoint.no_load_optim: 'maybe' is not one of true, false "
                                          r"\(checkpoint.no_load_optim is deprecated: use checkpoint.resume_optimizer\)"):
        config_from_dict({}, ["checkpoint.no_load_optim=maybe"])


def test_one_type_and_one_vocabulary():
    hints = typing.get_type_hints
    assert typing.get_args(MergeMethod) == METHODS
    cfg = RunConfig()
    assert all(isinstance(s, MergeSelection) for s in (cfg.merge, cfg.checkpoint.init_merge, cfg.recovery.merge))
    assert (hints(CheckpointConfig)["resume_optimizer"] is hints(CheckpointConfig)["init_optimizer"]
            is hints(RecoveryConfig)["optimizer"] is OptimizerState)
    text = reference_markdown()
    for key in ("checkpoint.init_merge.window", "checkpoint.init_merge.weights", "recovery.merge.weights",
                "recovery.merge.method", "merge.weights", "checkpoint.resume_optimizer"):
        assert f"| `{key}` |" in text


@pytest.mark.parametrize("key", ["checkpoint.resume_optimizer", "checkpoint.init_optimizer", "recovery.optimizer"])
def test_a_bad_optimizer_state_names_its_key(key):
    with pytest.raises(ConfigError, match=rf"^{key}: 'bogus' is not one of 'checkpoint', 'fresh'$"):
        config_from_dict({}, [f"{key}=bogus"])


# Each place switched on, with what it needs to validate; the selection's keys under SECTION.
def _place(section, tmp_path):
    return {
        "merge": ["merge.enabled=true", "merge.interval=5", "merge.save=false"],
        "checkpoint.init_merge": [f"checkpoint.init_from={tmp_path}", "checkpoint.init_merge.enabled=true"],
        "recovery.merge": ["recovery.enabled=true", f"checkpoint.save={tmp_path}", "checkpoint.save_interval=5"],
    }[section]


PLACES = ["merge", "checkpoint.init_merge", "recovery.merge"]


def _errors(section, tmp_path, overrides):
    cfg = config_from_dict({}, [*_place(section, tmp_path), *(f"{section}.{o}" for o in overrides)])
    return [e for e in validation_errors(cfg, world_size=1, cuda_available=False) if e.startswith(section)]


BAD = {
    "alpha_zero": (["method=ema", "ema_alpha=0"], ".ema_alpha: 0.0 must be in (0, 1]"),
    "alpha_above_one": (["method=ema", "ema_alpha=1.5"], ".ema_alpha: 1.5 must be in (0, 1]"),
    "weights_too_few": (["method=weights", "window=3", "weights=[1, 2]"],
                        ".weights: [1, 2] must be 3 non-negative numbers, not all 0"),
    "weights_negative": (["method=weights", "window=3", "weights=[1, -1, 1]"],
                         ".weights: [1, -1, 1] must be 3 non-negative numbers, not all 0"),
    "weights_all_zero": (["method=weights", "window=2", "weights=[0, 0]"], ".weights: [0, 0] must be 2"),
    "weights_not_numbers": (["method=weights", "window=2", "weights=[a, 1]"], ".weights: ['a', 1] must be 2"),
    "weights_without_method": (["method=sma", "window=2", "weights=[1, 1]"], ".weights is only used with "),
    "window_zero": (["window=0"], ".window: 0 must be >= "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_selection_is_reported_alike_in_each_place(case, tmp_path):
    overrides, expected = BAD[case]
    tails = set()
    for section in PLACES:
        errors = _errors(section, tmp_path, overrides)
        assert len(errors) == 1 and errors[0].startswith(section + expected), (section, errors)
        tails.add(errors[0][len(section):].replace(section, "<key>").split(" must be >= ")[0])
    assert len(tails) == 1, tails  # the same message, only the dotted key differs


@pytest.mark.parametrize("section", PLACES)
def test_good_selections_pass_in_each_place(section, tmp_path):
    assert _errors(section, tmp_path, ["method=weights", "window=3", "weights=[1, 2, 3]"]) == []
    assert _errors(section, tmp_path, ["method=ema", "ema_alpha=1"]) == []
    assert _errors(section, tmp_path, ["method=sma", "ema_alpha=5"]) == []  # alpha only matters for ema
    with pytest.raises(ConfigError, match=rf"^{section}.method: 'mean' is not one of 'sma', 'ema'"):
        config_from_dict({}, [*_place(section, tmp_path), f"{section}.method=mean"])


def test_how_many_checkpoints_each_place_needs(tmp_path):
    assert _errors("recovery.merge", tmp_path, ["window=1"]) == []  # the newest good one, as it is
    assert _errors("merge", tmp_path, ["window=1"]) == ["merge.window: 1 must be >= 2 (merging needs at least 2 "
                                                        "checkpoints)"]
    assert _errors("checkpoint.init_merge", tmp_path, ["window=1"]) == [
        "checkpoint.init_merge.window: 1 must be >= 2 (merging needs at least 2 checkpoints)"]


def test_in_training_ema_needs_no_window(tmp_path):
    """merge.method: ema is a running EMA over every snapshot: merge.window is not read, so not checked;
    the EMA of saved checkpoints (PMA-init, recovery) still takes its window."""
    from megatron_merge.online import OnlineMergeSpec

    for window in (1, 0):
        assert _errors("merge", tmp_path, ["method=ema", f"window={window}"]) == []
        spec = OnlineMergeSpec(method="ema", window=window, interval=1)
        assert spec.store_size == 0  # nothing kept per window: the one accumulator
    assert _errors("merge", tmp_path, ["method=sma", "window=1"]) != []
    assert _errors("checkpoint.init_merge", tmp_path, ["method=ema", "window=1"]) == [
        "checkpoint.init_merge.window: 1 must be >= 2 (merging needs at least 2 checkpoints)"]


def test_init_merge_counts_its_iterations(tmp_path):
    errors = _errors("checkpoint.init_merge", tmp_path, ["method=weights", "iterations=[4, 8, 12]", "weights=[1, 1]"])
    assert errors == ["checkpoint.init_merge.weights: [1, 1] must be 3 non-negative numbers, not all 0 (one per "
                      "checkpoint of checkpoint.init_merge.iterations, oldest first)"]
    assert _errors("checkpoint.init_merge", tmp_path, ["method=weights", "iterations=[4, 8]", "weights=[1, 3]"]) == []
    assert _errors("checkpoint.init_merge", tmp_path, ["iterations=[4]"]) == [
        "checkpoint.init_merge.iterations: [4] must name at least 2"]
    assert _errors("checkpoint.init_merge", tmp_path, ["iterations=[4, 4]"]) == [
        "checkpoint.init_merge.iterations: [4, 4] must be distinct saved iteration numbers"]
    assert _errors("checkpoint.init_merge", tmp_path, ["every=0"]) == ["checkpoint.init_merge.every: 0 must be >= 1"]
    cfg = config_from_dict({}, ["checkpoint.init_merge.enabled=true"])
    assert "checkpoint.init_merge.enabled needs checkpoint.init_from (a run directory)" in validation_errors(
        cfg, cuda_available=False)


def test_a_selection_key_one_level_up_points_to_its_section():
    with pytest.raises(ConfigError, match=r"unknown key 'recovery.weights'; did you mean 'recovery.merge.weights'\?"):
        config_from_dict({}, ["recovery.weights=[1, 2]"])
    with pytest.raises(ConfigError, match=r"unknown key 'checkpoint.every'; did you mean 'checkpoint.init_merge.every'"):
        config_from_dict({}, ["checkpoint.every=2"])
