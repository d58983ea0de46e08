import pytest
import torch

from rankdyna_trainer.calibration import blockwise, group_by_block, input_mean_squares, input_statistics
from rankdyna_trainer.targets import find_target_linears
from tests.conftest import tiny_bert, tiny_llama


def _batches(n=4, length=16, seed=0, padded=False):
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    batches = [{"input_ids": ids[: n // 2]}, {"input_ids": ids[n // 2 :]}]
    if padded:
        for batch in batches:
            mask = torch.ones_like(batch["input_ids"])
            mask[1, length // 2 :] = 0
            batch["attention_mask"] = mask
    return batches


def test_input_statistics_match_hand_computed_inputs_and_skip_padding():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[mask.bool()]
    torch.testing.assert_close(input_mean_squares(model, "model.layers.0", [name], batches)[name], x.pow(2).mean(0))
    second = input_statistics(model, "model.layers.0", [name], batches, "second_moment")[name]
    assert second.dtype == torch.float64
    torch.testing.assert_close(second, (x.double().T @ x.double()) / x.shape[0])


@pytest.mark.parametrize("statistic", ["mean_square", "second_moment"])
@pytest.mark.parametrize("padded", [False, True])
def test_each_block_is_calibrated_on_the_already_compressed_previous_blocks(statistic, padded):
    """The cached block-by-block pass gives what a full run of the partly compressed model gives."""
    model, reference = tiny_llama(), tiny_llama()
    batches = _batches(padded=padded)
    seen = {}

    def compress_block(block, names, stats):
        seen[block] = stats
        model.get_submodule(block).mlp.down_proj.weight.data.mul_(0.5)

    blockwise(model, find_target_linears(model), batches, compress_block, desc="test", statistic=statistic)
    for i, block in enumerate(["model.layers.0", "model.layers.1"]):
        names = list(seen[block])
        assert len(names) == 7
        expected = input_statistics(reference, block, names, batches, statistic)
        for name in names:
            torch.testing.assert_close(seen[block][name], expected[name], atol=1e-5, rtol=1e-4)
        reference.get_submodule(block).mlp.down_proj.weight.data.mul_(0.5)
    assert not model.training  # tiny_llama() is in eval mode, and blockwise restores it


def test_blockwise_works_on_an_encoder_with_padding():
    model, reference = tiny_bert(), tiny_bert()
    batches = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": torch.zeros(2).long()}
               for b in _batches(padded=True)]
    seen = {}

    def compress_block(block, names, stats):
        seen[block] = stats
        model.get_submodule(block).output.dense.weight.data.zero_()

    blockwise(model, find_target_linears(model), batches, compress_block, desc="test", statistic="second_moment")
    reference.bert.encoder.layer[0].output.dense.weight.data.zero_()
    name = "bert.encoder.layer.1.intermediate.dense"
    expected = input_statistics(reference, "bert.encoder.layer.1", [name], batches, "second_moment")[name]
    torch.testing.assert_close(seen["bert.encoder.layer.1"][name], expected, atol=1e-6, rtol=1e-5)


def test_bad_calibration_input_fails_early():
    model = tiny_llama()
    targets = find_target_linears(model)
    with pytest.raises(ValueError, match="at least one batch"):
        blockwise(model, targets, [], lambda *a: None, desc="test")
    with pytest.raises(ValueError, match="statistic must be one of"):
        blockwise(model, targets, _batches(), lambda *a: None, desc="test", statistic="variance")
    with pytest.raises(ValueError, match="numbered block"):
        group_by_block(["lm_head"])
    empty = [{"input_ids": torch.randint(0, 128, (1, 4)), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}]
    with pytest.raises(ValueError, match="No calibration token"):
        blockwise(model, targets, empty, lambda *a: None, desc="test")


def test_layers_reading_the_same_input_share_one_statistic():
    model = tiny_llama()
    seen = {}
    blockwise(model, find_target_linears(model), _batches(padded=True),
              lambda block, names, stats: seen.update(stats), desc="test", statistic="second_moment")
    prefix = "model.layers.1."
    q, k, v, o = (seen[prefix + f"self_attn.{p}_proj"] for p in "qkvo")
    gate, up, down = (seen[prefix + f"mlp.{p}_proj"] for p in ("gate", "up", "down"))
    assert q is k and k is v and gate is up
    assert o is not q and down is not gate and gate is not q
