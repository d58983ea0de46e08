import itertools

import pytest
import torch

from rankdyna_trainer.budget import ParameterBudget, allocate_groups, matrix_cost


def reference_allocation(scores, shapes, budget):
    """Plain-Python greedy: walk all groups by descending score, pay each group's marginal cost until the
    budget runs out, then give all groups to matrices that ended at or past break-even."""
    groups = [(float(s), k, i) for k, row in enumerate(scores) for i, s in enumerate(row.tolist())]
    # Python's sort is stable: equal scores keep matrix-major, index order, like the tensor version.
    within = [sorted(range(len(row)), key=lambda i: -float(row[i])) for row in scores]
    position = {(k, i): p + 1 for k, order in enumerate(within) for p, i in enumerate(order)}
    groups.sort(key=lambda g: -g[0])
    spent, kept = 0, set()
    for _, k, i in groups:
        m, n = shapes[k]
        p = position[(k, i)]
        cost = matrix_cost(p, m, n) - matrix_cost(p - 1, m, n)
        if spent + cost > budget:
            break
        spent += cost
        kept.add((k, i))
    masks = []
    for k, row in enumerate(scores):
        m, n = shapes[k]
        count = sum(1 for i in range(len(row)) if (k, i) in kept)
        full = count * (m + n) >= m * n
        masks.append([full or (k, i) in kept for i in range(len(row))])
    return masks


@pytest.mark.parametrize("seed,fraction", list(itertools.product(range(4), [0.05, 0.3, 0.6, 0.95])))
def test_allocation_matches_plain_greedy_reference(seed, fraction):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 8), (16, 8), (8, 24), (5, 5), (12, 3)]
    scores = [torch.rand(min(m, n), generator=g) for m, n in shapes]
    budget = int(fraction * sum(m * n for m, n in shapes))
    masks = allocate_groups(scores, shapes, budget)
    assert [m.tolist() for m in masks] == reference_allocation(scores, shapes, budget)
    spent = sum(matrix_cost(int(m.sum()), *shape) for m, shape in zip(masks, shapes))
    assert spent <= budget


def test_allocation_keeps_highest_scores_and_frees_groups_past_break_even():
    shapes = [(4, 4), (4, 4)]
    # Matrix 0 has all the importance: after 2 groups (cost 16 = dense) the rest are free.
    scores = [torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([0.1, 0.2, 0.0, 0.0])]
    masks = allocate_groups(scores, shapes, budget_params=16)
    assert masks[0].all()
    assert not masks[1].any()


def test_allocation_breaks_ties_deterministically():
    shapes = [(6, 6)] * 3
    scores = [torch.ones(6)] * 3
    first = allocate_groups(scores, shapes, 40)
    second = allocate_groups(scores, shapes, 40)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Stable order favours the first matrix: 3 groups (cost 36 = dense) fit, so it keeps all 6 for free.
    assert [int(m.sum()) for m in first] == [6, 0, 0]


def test_cubic_schedule_matches_formula_and_phases():
    budget = ParameterBudget.from_fractions(1000, 1.0, 0.4, total_steps=100, warmup_fraction=0.1,
                                            final_fraction=0.2, interval=5)
    assert (budget.warmup_steps, budget.final_start) == (10, 80)
    assert budget.fraction_at(0) == budget.fraction_at(9) == 1.0
    for step in (10, 25, 50, 79):
        progress = (step - 10) / 70
        assert budget.fraction_at(step) == pytest.approx(0.4 + 0.6 * (1 - progress) ** 3)
    assert budget.fraction_at(80) == budget.fraction_at(99) == 0.4
    reallocations = [s for s in range(100) if budget.is_reallocation_step(s)]
    assert reallocations == list(range(10, 80, 5)) + [80]
    assert budget.tracks_scores(80) and not budget.tracks_scores(81)


def test_schedule_rejects_unknown_steps_and_no_room():
    with pytest.raises(ValueError, match="optimizer steps must be known"):
        ParameterBudget.from_fractions(10, 1.0, 0.5, total_steps=-1, warmup_fraction=0.1, final_fraction=0.1)
    with pytest.raises(ValueError, match="no step to prune"):
        ParameterBudget.from_fractions(10, 1.0, 0.5, total_steps=4, warmup_fraction=0.5, final_fraction=0.4)


def test_matrix_cost_is_capped_at_dense():
    assert matrix_cost(0, 10, 20) == 0
    assert matrix_cost(3, 10, 20) == 90
    assert matrix_cost(7, 10, 20) == 200


@pytest.mark.parametrize("seed,fraction,multiple", list(itertools.product(range(3), [0.2, 0.33, 0.5], [4, 8])))
def test_rank_multiple_rounds_every_rank_and_stays_within_the_budget(seed, fraction, multiple):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48, 64), (96, 40), (40, 40), (30, 70)]
    scores = [torch.rand(min(m, n), generator=g) for m, n in shapes]
    budget = int(fraction * sum(m * n for m, n in shapes))
    masks = allocate_groups(scores, shapes, budget, rank_multiple=multiple)
    for mask, (m, n) in zip(masks, shapes):
        rank = int(mask.sum())
        assert rank % multiple == 0 or rank == min(m, n), (rank, m, n)
    spent = sum(matrix_cost(int(mask.sum()), *shape) for mask, shape in zip(masks, shapes))
    assert spent <= budget
    # Rounding costs at most one block of the most expensive matrix, beyond what groups one at a time spend.
    unrounded = sum(matrix_cost(int(mask.sum()), *shape)
                    for mask, shape in zip(allocate_groups(scores, shapes, budget), shapes))
    assert spent >= unrounded - multiple * max(m + n for m, n in shapes) * len(shapes)
    assert spent > 0.8 * budget


def test_rank_multiple_keeps_each_matrix_best_groups_and_uniform_ranks():
    shapes = [(128, 128)] * 3
    # Uniform-rank scores (group i scores -i): the budget of rank 10 everywhere rounds down to 8 everywhere.
    scores = [-torch.arange(128, dtype=torch.float32)] * 3
    masks = allocate_groups(scores, shapes, budget_params=3 * 10 * 256, rank_multiple=8)
    assert [int(m.sum()) for m in masks] == [8, 8, 8]
    assert all(m[:8].all() and not m[8:].any() for m in masks)
    # The kept groups are the best-scoring ones, wherever they sit in the matrix.
    shuffled = [torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0, 2.0, 6.0, 7.0])]
    mask = allocate_groups(shuffled, [(8, 16)], budget_params=4 * 24, rank_multiple=4)[0]
    assert mask.tolist() == [False, True, False, True, False, False, True, True]


def test_rank_multiple_with_min_rank_and_bad_values():
    shapes = [(64, 64), (64, 64)]
    scores = [torch.linspace(10, 9, 64), torch.linspace(1, 0, 64)]
    masks = allocate_groups(scores, shapes, budget_params=24 * 128, min_rank=3, rank_multiple=8)
    assert [int(m.sum()) for m in masks] == [16, 8]  # the floor of 3 is paid as one block of 8
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="rank_multiple must be an integer >= 1"):
            allocate_groups(scores, shapes, 1000, rank_multiple=bad)


@pytest.mark.parametrize("total_steps, final_fraction", [(2, 0.2), (10, 0.0), (7, 0.01)])
def test_the_last_step_allocates_at_the_target_when_the_final_phase_rounds_to_nothing(total_steps, final_fraction):
    budget = ParameterBudget.from_fractions(dense_params=1000, initial_fraction=1.0, target_fraction=0.3,
                                            total_steps=total_steps, warmup_fraction=0.0,
                                            final_fraction=final_fraction)
    last = total_steps - 1  # the Trainer's optimizer steps are 0 .. total_steps - 1
    assert budget.is_reallocation_step(last) and budget.params_at(last) == 300
