import pytest
import torch
from torch import nn

from rankdyna_trainer.budget import matrix_cost
from rankdyna_trainer.export import LowRankLinear, exported_params
from rankdyna_trainer.methods.lorap import (
    LoRAPConfig,
    LowRankSVDConfig,
    attention_ranks,
    channels_to_keep,
    compress_lorap,
    compress_svd,
    ffn_channel_scores,
    input_mean_squares,
    svd_factors,
    uniform_rank,
)
from rankdyna_trainer.quantizer import load_compressed_model, save_compressed_model
from rankdyna_trainer.targets import find_target_linears
from tests.conftest import tiny_llama


def _batches(n=4, length=16, seed=0):
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[: n // 2]}, {"input_ids": ids[n // 2 :]}]


def _dense_target_params(model):
    return sum(l.weight.numel() for l in find_target_linears(model).values())


# -- building blocks against brute-force references ------------------------------------------------------
def test_svd_factors_is_truncated_svd_and_weighting_minimizes_weighted_error():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 8, generator=g)
    rms = torch.rand(8, generator=g) * 3 + 0.1
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    left, right = svd_factors(W, 3)
    torch.testing.assert_close(left @ right, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-5, rtol=1e-5)
    # A constant weight changes nothing; a real weighting wins on the weighted error it optimizes.
    l_const, r_const = svd_factors(W, 3, torch.full((8,), 2.0))
    torch.testing.assert_close(l_const @ r_const, left @ right, atol=1e-5, rtol=1e-5)
    lw, rw = svd_factors(W, 3, rms)
    weighted_error = lambda approx: torch.linalg.norm((W - approx) * rms[None, :])  # noqa: E731
    assert weighted_error(lw @ rw) < weighted_error(left @ right)
    torch.testing.assert_close(svd_factors(W, 8, rms)[0] @ svd_factors(W, 8, rms)[1], W, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(32, 32), (16, 32), (64, 32), (7, 5)])
@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8, 1.0])
def test_uniform_rank_is_largest_rank_within_budget(shape, budget):
    m, n = shape
    fitting = [r for r in range(min(m, n) + 1) if matrix_cost(r, m, n) <= budget * m * n]
    assert uniform_rank(budget, m, n) == max(fitting)


def test_attention_ranks_match_exhaustive_search_and_favour_v_o():
    shapes = {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32)}
    weights = {"q": 1.0, "k": 1.0, "v": 2.0, "o": 2.0}
    for budget in (300, 1000, 1800, 2500, 10_000):
        ranks = attention_ranks(shapes, weights, budget)
        cost = lambda rs: sum(matrix_cost(rs[n], *shapes[n]) for n in shapes)  # noqa: E731
        ranks_at = lambda r: {n: min(int(r * weights[n]), min(shapes[n])) for n in shapes}  # noqa: E731
        feasible = [r for r in range(33) if cost(ranks_at(r)) <= budget]
        best = max(feasible)
        assert ranks == ranks_at(best)
        assert cost(ranks) <= budget
        assert ranks["v"] >= ranks["k"] and ranks["o"] >= ranks["q"]


def test_ffn_channel_scores_match_loops():
    g = torch.Generator().manual_seed(1)
    gate, up, down = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False), nn.Linear(6, 4, bias=False)
    a, b = torch.rand(4, generator=g), torch.rand(6, generator=g)
    scores = ffn_channel_scores([gate, up], [down], [a, a], [b])
    for c in range(6):
        expected = sum(abs(gate.weight[c, j].item()) * a[j].item() + abs(up.weight[c, j].item()) * a[j].item()
                       for j in range(4))
        expected += sum(abs(down.weight[k, c].item()) * b[c].item() for k in range(4))
        assert scores[c].item() == pytest.approx(expected, rel=1e-5)


def test_channels_to_keep_protects_the_lowest_scores():
    scores = torch.tensor([5.0, 0.1, 9.0, 3.0, 0.2, 7.0, 1.0, 8.0, 2.0, 6.0])
    ascending = sorted(range(10), key=lambda i: scores[i].item())
    # 20% protected -> the two lowest (1 and 4) stay, then the 3 highest of the rest (2, 7, 5).
    assert channels_to_keep(scores, 5, 0.2).tolist() == sorted(ascending[:2] + ascending[::-1][:3])
    assert channels_to_keep(scores, 5, 0.0).tolist() == sorted(ascending[::-1][:5])
    assert channels_to_keep(scores, 10, 0.2).tolist() == list(range(10))


# -- whole methods on a tiny LLaMA -------------------------------------------------------------------------
def _reload_matches(model, modules, method, tmp_path):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    save_compressed_model(model, str(tmp_path), modules, method)
    reloaded = load_compressed_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    return reloaded


@pytest.mark.parametrize("weighted", [False, True])
def test_svd_baselines_meet_budget_and_reload(weighted, tmp_path):
    model = tiny_llama()
    dense = _dense_target_params(model)
    modules = compress_svd(model, LowRankSVDConfig(target_budget=0.5, activation_weighted=weighted), _batches())
    assert sum(exported_params(e) for e in modules.values()) <= 0.5 * dense
    assert all(e["type"] == "low_rank" for e in modules.values())
    _reload_matches(model, modules, "asvd" if weighted else "svd", tmp_path)


def test_svd_at_full_budget_reproduces_the_model():
    model, reference = tiny_llama(), tiny_llama()
    compress_svd(model, LowRankSVDConfig(target_budget=1.0, activation_weighted=True), _batches())
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_lorap_meets_budget_prunes_ffn_physically_and_reloads(tmp_path):
    model = tiny_llama()
    dense = _dense_target_params(model)
    modules = compress_lorap(model, LoRAPConfig(target_budget=0.5), _batches())
    assert sum(exported_params(e) for e in modules.values()) <= 0.5 * dense
    for i in range(2):
        prefix = f"model.layers.{i}."
        # FFN: 64 channels -> floor(0.5 * 64) = 32, exported as plain (smaller) Linear layers.
        expected = {"type": "linear", "in_features": 32, "out_features": 32, "bias": False}
        assert modules[prefix + "mlp.gate_proj"] == expected
        assert modules[prefix + "mlp.down_proj"]["in_features"] == 32
        attention = {n: model.get_submodule(f"{prefix}self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        assert all(isinstance(l, LowRankLinear) for l in attention.values())
        assert attention["v_proj"].rank > attention["k_proj"].rank
        assert attention["o_proj"].rank > attention["q_proj"].rank
    reloaded = _reload_matches(model, modules, "lorap", tmp_path)
    assert reloaded.model.layers[0].mlp.up_proj.weight.shape == (32, 32)


def test_lorap_keeps_the_selected_channels_exactly():
    model, reference = tiny_llama(), tiny_llama()
    batches = _batches()
    compress_lorap(model, LoRAPConfig(target_budget=0.5, protected_fraction=0.05), batches)
    # Channel selection in block 0 sees the untouched embeddings, so it can be recomputed independently.
    mlp = reference.model.layers[0].mlp
    stats = input_mean_squares(reference, "model.layers.0",
                               ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"], batches)
    a, b = stats["model.layers.0.mlp.gate_proj"].sqrt(), stats["model.layers.0.mlp.down_proj"].sqrt()
    keep = channels_to_keep(ffn_channel_scores([mlp.gate_proj, mlp.up_proj], [mlp.down_proj], [a, a], [b]), 32, 0.05)
    assert round(0.05 * 64) == 3 and len(keep) == 32
    torch.testing.assert_close(model.model.layers[0].mlp.gate_proj.weight, mlp.gate_proj.weight[keep])
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, mlp.down_proj.weight[:, keep])


def test_bad_inputs_fail_early():
    with pytest.raises(ValueError, match="target_budget"):
        LoRAPConfig(target_budget=0.0)
    with pytest.raises(ValueError, match="vo_rank_ratio"):
        LoRAPConfig(vo_rank_ratio=0.5)
    with pytest.raises(ValueError, match="protected_fraction"):
        LoRAPConfig(protected_fraction=1.0)
    with pytest.raises(ValueError, match="calibration_batches"):
        compress_svd(tiny_llama(), LowRankSVDConfig(activation_weighted=True))
    with pytest.raises(ValueError, match="at least one batch"):
        compress_lorap(tiny_llama(), LoRAPConfig(), [])
