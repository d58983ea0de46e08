"""scripts/glue_controls.py: control folders beside the campaign, and average retention, from run files alone."""

import statistics

import pytest

from tests.experiment.test_glue_report import campaign, run_record, write_runs

from .test_glue_table import _load_script


def test_prints_the_control_table_and_the_retention_of_one_seed(tmp_path, capsys):
    controls = _load_script("glue_controls")
    write_runs(tmp_path / "campaign", campaign())
    write_runs(tmp_path / "late", [run_record("rte", "rankdyna", 0.5, 1, 55.0)])
    controls.main(["--campaign", str(tmp_path / "campaign"), "--variant", f"late start={tmp_path / 'late'}",
                   "--retention_seed", "42"])
    out = capsys.readouterr().out
    assert "| cell | floor | dense | rankdyna (campaign) | late start | fwsvd |" in out
    assert "| RTE @ 0.5 | 52.7 |" in out and "| · / 55.0 / · | — |" in out
    assert "| rankdyna@0.5 |" in out and "| svd@0.33 |" not in out  # one task only: no four-task average


def test_method_sets_variants_beside_the_equal_step_rows_and_shows_only_those_runs(tmp_path, capsys):
    controls = _load_script("glue_controls")
    write_runs(tmp_path / "campaign", campaign() + [run_record("rte", "rankdyna_equal", 0.5, 42, 57.0)])
    write_runs(tmp_path / "final", [run_record("rte", "rankdyna_equal", 0.5, 42, 58.0),
                                    run_record("rte", "rankdyna", 0.5, 1, 50.0)])
    controls.main(["--campaign", str(tmp_path / "campaign"), "--method", "rankdyna_equal",
                   "--variant", f"final 0.4={tmp_path / 'final'}"])
    out = capsys.readouterr().out
    assert "| rankdyna_equal (campaign) | final 0.4 |" in out
    assert "| 57.0 / · / · | 58.0 / · / · |" in out and "50.0" not in out  # the one-round run is not this row's


@pytest.mark.parametrize("argv, named", [(["--variant", "no-equals-sign"], "--variant"),
                                         (["--variant", "x=/no/such/folder"], "/no/such/folder"),
                                         ([], "nothing to print")])
def test_bad_input_is_one_line_naming_what_is_wrong(argv, named, tmp_path, capsys):
    controls = _load_script("glue_controls")
    write_runs(tmp_path, campaign())
    with pytest.raises(SystemExit) as stopped:
        controls.main(["--campaign", str(tmp_path)] + argv)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_headline_table_has_floor_dense_and_a_row_per_method_and_budget(tmp_path, capsys):
    from tests.experiment.test_glue_report import run_record

    controls = _load_script("glue_controls")
    records = campaign() + [run_record(t, "fwsvd", 0.5, 42, score) for t, score in
                            [("sst2", 84.0), ("mrpc", 85.0), ("cola", 25.0), ("rte", 56.0)]]
    write_runs(tmp_path, records)
    controls.main(["--campaign", str(tmp_path), "--headline"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| row | budget | SST2 | MRPC | COLA | RTE | kept of dense (average) |"
    assert lines[2] == "| floor (constant prediction) | | 50.9 | 81.2 | 0.0 | 52.7 | |"
    assert lines[3].startswith("| dense | 1 | ") and lines[3].endswith("| 100.0 % |")
    # rankdyna@0.5 is dense - 2 on every seed (seed noise -1, 0, +1.5: means 2 / 3 - 0.5 above the task's value);
    # fwsvd has one seed, which its cells say
    shift = 1 / 6
    expected = 100 * statistics.fmean((d - 2 + shift) / (d + shift) for d in (86, 86, 30, 57))
    assert lines[4] == f"| RankDyna, one round | 0.5 | 84.2 | 84.2 | 28.2 | 55.2 | {expected:.1f} % |"
    assert lines[5].startswith("| FWSVD, two rounds | 0.5 | 84.0 (n 1) | 85.0 (n 1) | 25.0 (n 1) | 56.0 (n 1) |")
    assert len(lines) == 6  # no rankdyna_equal runs, no 0.33 / 0.2 rows


def test_headline_adds_the_average_of_the_tasks_that_decide_when_one_is_set_apart(tmp_path, capsys):
    controls = _load_script("glue_controls")
    # RTE's dense (mean 54.0) is less than 3 points above its floor (52.7): it does not decide, and RankDyna has no
    # RTE run yet, so only the average over the other three tasks exists for it.
    records = [r for r in campaign() if not (r["task"] == "rte" and r["method"] != "dense")]
    for r in records:
        if r["task"] == "rte":
            r["score"] = 54.0
    write_runs(tmp_path, records)
    controls.main(["--campaign", str(tmp_path), "--headline"])
    out = capsys.readouterr().out
    assert out.startswith("| row | budget | SST2 | MRPC | COLA | RTE | kept of dense (average) | kept of dense "
                          "(average of SST2, MRPC, COLA) |")
    shift = 1 / 6  # seed noise -1, 0, +1.5: every mean is this above the task's value
    expected = 100 * statistics.fmean((d - 2 + shift) / (d + shift) for d in (86, 86, 30))
    assert f"| RankDyna, one round | 0.5 | 84.2 | 84.2 | 28.2 | — | — | {expected:.1f} % |" in out


def test_a_variant_folder_counts_its_runs_whatever_row_tag_their_config_gives(tmp_path, capsys):
    controls = _load_script("glue_controls")
    write_runs(tmp_path / "campaign", campaign())
    attn = run_record("cola", "rankdyna", 0.5, 42, 31.5)
    attn["config"] = {"ffn_groups": "channels", "attention_groups": "channels"}  # a rankdyna+attn run
    write_runs(tmp_path / "attn", [attn])
    controls.main(["--campaign", str(tmp_path / "campaign"), "--variant", f"attention channels={tmp_path / 'attn'}"])
    out = capsys.readouterr().out
    assert "| COLA @ 0.5 | 0.0 |" in out and "| 31.5 / · / · |" in out
