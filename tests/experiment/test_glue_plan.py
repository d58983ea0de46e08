"""The GLUE campaign's plan: rows, order, file names and how long each row trains (experiment/glue_plan.py)."""

import os

import pytest

from rankdyna_trainer.experiment import glue_plan


def test_rankdyna_equal_runs_rankdyna_for_fwsvds_two_rounds_in_one_run():
    assert glue_plan.trained_method("rankdyna_equal") == "rankdyna"
    assert glue_plan.trained_method("fwsvd") == "fwsvd" and glue_plan.rounds_of_work("fwsvd") == 1
    # PROTOCOL's rounds (SST-2 2 epochs, MRPC/CoLA 3, RTE 6) and an --epochs override alike: twice the round
    assert [glue_plan.run_epochs("rankdyna_equal", e) for e in (2.0, 3.0, 6.0, 1.0)] == [4.0, 6.0, 12.0, 2.0]
    assert glue_plan.run_epochs("rankdyna", 3.0) == 3.0
    # MRPC: 3,668 rows in batches of 32 -> 115 batches an epoch; FWSVD's dense round + own round = 2 x 345
    protocol = {"train_rows_used": 3668, "batch_size": 32, "epochs": 3.0}
    assert glue_plan.round_steps(3668, 32, 3.0) == 345
    assert glue_plan.fwsvd_steps(protocol) == 690 == glue_plan.round_steps(3668, 32, glue_plan.run_epochs(
        "rankdyna_equal", 3.0))


def test_a_fractional_round_is_refused_with_rankdyna_equal_only():
    with pytest.raises(ValueError, match=r"--epochs 1\.5 with rankdyna_equal: .* give an integer"):
        glue_plan.check_whole_epochs(["dense", "rankdyna_equal"], 1.5)
    # 1.5 epochs of 3 batches: ceil(4.5) + ceil(4.5) = 10 steps for FWSVD but ceil(9) = 9 in one run
    assert 2 * glue_plan.round_steps(96, 32, 1.5) != glue_plan.round_steps(96, 32, 3.0)
    glue_plan.check_whole_epochs(["rankdyna", "fwsvd"], 1.5)  # no equal-work row: any round is fine
    glue_plan.check_whole_epochs(["rankdyna_equal"], None)  # PROTOCOL's whole epochs
    glue_plan.check_whole_epochs(["rankdyna_equal"], 2.0)


def test_plan_puts_rankdyna_equal_beside_rankdyna_and_names_its_files():
    plan = glue_plan.run_plan(["cola"], ["fwsvd", "rankdyna_equal", "dense", "rankdyna"], [0.5, 0.2], [42])
    assert plan == [("cola", "dense", None, 42),
                    ("cola", "rankdyna", 0.5, 42), ("cola", "rankdyna_equal", 0.5, 42), ("cola", "fwsvd", 0.5, 42),
                    ("cola", "rankdyna", 0.2, 42), ("cola", "rankdyna_equal", 0.2, 42), ("cola", "fwsvd", 0.2, 42)]
    assert glue_plan.run_path("runs", "cola", "rankdyna_equal", 0.33, 1) == os.path.join(
        "runs", "cola", "rankdyna_equal_b0.33_seed1.json")
    assert glue_plan.method_tag("rankdyna_equal", 8, "singular") == "rankdyna_equal+m8+singular"
    assert glue_plan.method_tag("dense", 8, "singular") == "dense"
    assert glue_plan.method_tag("rankdyna", 1, "channels", "channels") == "rankdyna"
    assert glue_plan.method_tag("rankdyna", 1, "channels", "singular") == "rankdyna+attn_singular"
    assert glue_plan.method_tag("rankdyna", 1, "singular", "singular") == "rankdyna+singular+attn_singular"
    assert glue_plan.method_tag("fwsvd", 1, "singular", "singular") == "fwsvd"
    assert glue_plan.run_path("runs", "cola", "rankdyna", 0.2, 42, attention_groups="singular") == os.path.join(
        "runs", "cola", "rankdyna+attn_singular_b0.2_seed42.json")
