"""scripts/glue_controls.py: control folders beside the campaign, and average retention, from run files alone."""

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
