"""A paired difference inside or beyond the seeds' noise (experiment/seed_noise.py)."""

import statistics

from rankdyna_trainer.experiment import seed_noise


def test_seeds_that_disagree_are_noise_and_seeds_that_agree_are_not():
    disagree = [1.2, -2.0, 0.4]  # mean -0.13, standard error 0.96
    assert seed_noise.standard_error(disagree) == statistics.stdev(disagree) / 3 ** 0.5
    assert seed_noise.inside_noise(disagree)
    assert seed_noise.noise_text(disagree) == "mean -0.1 ± 1.0 standard error: inside the seeds' noise"
    agree = [-0.9, -1.0, -1.1]
    assert not seed_noise.inside_noise(agree)
    assert seed_noise.noise_text(agree).endswith("beyond the seeds' noise")


def test_one_seed_is_never_called_noise():
    assert not seed_noise.inside_noise([0.0])
    assert seed_noise.noise_text([0.5]) == "one seed: no noise estimate"
