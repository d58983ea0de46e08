import pytest

from rankdyna_trainer.targets import find_target_linears
from tests.conftest import tiny_bert, tiny_llama


def test_bert_defaults_select_all_six_projections_per_layer():
    names = find_target_linears(tiny_bert())
    assert len(names) == 2 * 6
    assert not any("classifier" in n or "pooler" in n for n in names)


def test_llama_defaults_select_attention_and_mlp_projections():
    names = find_target_linears(tiny_llama())
    assert len(names) == 2 * 7
    assert "lm_head" not in names


def test_regex_and_suffix_targets():
    model = tiny_bert()
    assert set(find_target_linears(model, r".*layer\.0\.attention\.self\.(query|key)")) == {
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"}
    assert len(find_target_linears(model, ["intermediate.dense"])) == 2


def test_targets_that_match_nothing_name_the_problem():
    with pytest.raises(ValueError, match="matched no Linear layer.*bert.encoder"):
        find_target_linears(tiny_bert(), ["q_proj"])
