"""The CPU share a timed run records (experiment/cpu_share.py): alone it is near 1, beside an equal job well below."""

import multiprocessing
import os
import sys
import time

import pytest

from rankdyna_trainer.experiment.cpu_share import SHARED_BELOW, CpuShare, shared_machine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def spin_for(seconds: float) -> None:  # a module-level target, so the spawn start method can run it
    spin(seconds)


def test_a_busy_loop_is_most_of_the_machines_busy_time_and_a_competitor_on_every_core_halves_it():
    cores = len(os.sched_getaffinity(0))
    alone = CpuShare()
    spin(0.6)
    # Other processes of the machine may run too, so "alone" is only bounded from below by a loose margin.
    assert alone.share() > 0.3
    shared = CpuShare()
    others = [multiprocessing.get_context("spawn").Process(target=spin_for, args=(2.0,)) for _ in range(cores)]
    for p in others:
        p.start()
    spin(1.5)
    share = shared.share()
    for p in others:
        p.join()
    # One spinning thread against `cores` spinning processes: at most about 1 / (cores + 1) of the busy time
    # (children not yet joined are not counted as ours).
    assert share < SHARED_BELOW and shared_machine(share)


def test_no_measurement_is_no_verdict():
    assert not shared_machine(None)
    assert not shared_machine(SHARED_BELOW)
    assert shared_machine(SHARED_BELOW - 0.01)
