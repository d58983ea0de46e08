import pytest
import torch
import transformers as T
from torch import nn

from rankdyna_trainer.targets import default_target_names, find_target_linears, linear_weight, repeated_blocks
from tests.conftest import tiny_bert, tiny_llama
from tests.tiny_models import ARCHITECTURES


def test_bert_defaults_select_all_six_projections_per_layer():
    names = find_target_linears(tiny_bert())
    assert len(names) == 2 * 6
    assert not any("classifier" in n or "pooler" in n for n in names)


def test_llama_defaults_select_attention_and_mlp_projections():
    names = find_target_linears(tiny_llama())
    assert len(names) == 2 * 7
    assert "lm_head" not in names


@pytest.mark.parametrize("arch, blocks", [
    ("bert", ["bert.encoder.layer.0", "bert.encoder.layer.1"]),  # BertLayer; BertEmbeddings is left out
    ("distilbert", ["distilbert.transformer.layer.0", "distilbert.transformer.layer.1"]),  # no _no_split_modules
    ("albert", ["albert.encoder.albert_layer_groups.0"]),  # outermost list element, not the nested layer
    ("t5", ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]),
])
def test_repeated_blocks_come_from_no_split_modules_or_module_lists(arch, blocks):
    assert list(repeated_blocks(ARCHITECTURES[arch].build())) == blocks


def test_albert_embedding_projection_outside_the_blocks_is_not_a_target():
    names = default_target_names(ARCHITECTURES["albert"].build())
    assert "albert.encoder.embedding_hidden_mapping_in" not in names and len(names) == 6


def test_moe_routers_are_not_targets_but_experts_are():
    config = T.Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    model = T.Qwen2MoeForCausalLM(config)
    names = default_target_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    routers = [n for n in linears if n.endswith((".gate", ".shared_expert_gate"))]
    assert routers and not set(routers) & set(names)
    assert set(names) == set(linears) - set(routers)


def test_conv1d_weight_is_read_as_out_by_in():
    gpt2 = ARCHITECTURES["gpt2"].build()
    c_attn = gpt2.get_submodule("transformer.h.0.attn.c_attn")
    assert linear_weight(c_attn).shape == (96, 32) and torch.equal(linear_weight(c_attn), c_attn.weight.T)


def test_regex_and_suffix_targets():
    model = tiny_bert()
    assert set(find_target_linears(model, r".*layer\.0\.attention\.self\.(query|key)")) == {
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"}
    assert len(find_target_linears(model, ["intermediate.dense"])) == 2


def test_targets_that_match_nothing_name_the_problem():
    with pytest.raises(ValueError, match="matched no Linear/Conv1D layer.*bert.encoder"):
        find_target_linears(tiny_bert(), ["q_proj"])


def test_compiled_model_gives_unprefixed_names():
    compiled = torch.compile(tiny_bert(), backend="eager")
    assert set(find_target_linears(compiled)) == set(find_target_linears(tiny_bert()))
