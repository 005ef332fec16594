

def test_merge_refuses_a_deepspeed_rank_file_missing_from_every_input(tmp_path):
    """The stored mp_world_size says two model-parallel ranks; both inputs lack rank 1's file."""
    inputs = [deepspeed_tag(tmp_path / "ds" / f"global_step{s}", s, {"mp_world_size": 2}) for s in (1, 2)]
    out = tmp_path / "merged"
    code, err = run_cli(["--out", out, *inputs])
    line = single_error_line(err)
    assert code == 1 and "mp_rank_01_model_states.pt: missing" in line and "mp_world_size=2" in line, line
    assert_no_output(out)
