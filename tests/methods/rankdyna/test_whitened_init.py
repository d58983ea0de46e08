"""RankDyna's whitened start: factors of SVD(W S) S^-1 calibrated block by block (RankDynaConfig(init="whitened"))."""

import pytest
import torch

from rankdyna_trainer import RankDynaConfig, SVDLinear, prepare_model
from rankdyna_trainer.calibration import input_statistics
from rankdyna_trainer.methods.rankdyna import svd_layers
from tests.conftest import tiny_bert, tiny_llama


def _batches(n=8, length=16, seed=0):
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[: n // 2]}, {"input_ids": ids[n // 2 :]}]


@torch.no_grad()
def test_full_rank_whitened_start_reproduces_decoder_and_encoder_outputs():
    ids = _batches()[0]["input_ids"]
    model, reference = tiny_llama(), tiny_llama()
    prepare_model(model, RankDynaConfig(init="whitened", factor_budget=None), _batches())
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    bert, bert_reference = tiny_bert(), tiny_bert()
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    calibration = [{"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(ids), dtype=torch.long)}]
    prepare_model(bert, RankDynaConfig(init="whitened", factor_budget=None), calibration)
    torch.testing.assert_close(bert(input_ids=ids, attention_mask=mask).logits,
                               bert_reference(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_whitened_groups_keep_more_output_energy_than_plain_svd_groups():
    """At the same (break-even) rank, block 0's layers lose less output on the calibration inputs."""
    batches = _batches()
    reference = tiny_llama()
    names = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    inputs = input_statistics(reference, "model.layers.0", names, batches, "second_moment")
    whitened, plain = tiny_llama(), tiny_llama()
    truncated = {"factor_budget": 1.0, "untrained_groups": "dropped", "ffn_groups": "singular"}
    prepare_model(whitened, RankDynaConfig(init="whitened", whitening_damping=0.0, **truncated), batches)
    prepare_model(plain, RankDynaConfig(init="svd", **truncated))
    for name in names:
        weight = reference.get_submodule(name).weight.double()

        def output_error(model):
            delta = weight - model.get_submodule(name).effective_weight().double()
            return torch.trace(delta @ inputs[name] @ delta.T)

        assert whitened.get_submodule(name).max_rank == plain.get_submodule(name).max_rank
        assert output_error(whitened) < output_error(plain)


def test_whitened_factors_have_orthonormal_u_and_unit_rows_of_v():
    model = prepare_model(tiny_llama(), RankDynaConfig(init="whitened"), _batches())
    for layer in svd_layers(model).values():
        eye = torch.eye(layer.max_rank)
        U, V = layer.left(), layer.right()  # the factors, frozen part included (U, V store them scaled)
        torch.testing.assert_close(U.T @ U, eye, atol=1e-4, rtol=0)
        torch.testing.assert_close(V.norm(dim=1), torch.ones(layer.max_rank), atol=1e-5, rtol=0)
        assert bool((layer.s > 0).all())


def test_whitened_start_needs_calibration_batches():
    with pytest.raises(ValueError, match="needs calibration data"):
        prepare_model(tiny_llama(), RankDynaConfig(init="whitened"))
    model = tiny_llama()
    prepare_model(model, RankDynaConfig(init="svd"), _batches())  # calibration is simply not needed there
    assert all(isinstance(l, SVDLinear) for l in svd_layers(model).values())
