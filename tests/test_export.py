import json

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from rankdyna_trainer import LowRankLinear, RankDynaConfig, export_model, prepare_model, read_compression_config
from rankdyna_trainer.budget import matrix_cost
from rankdyna_trainer.methods.rankdyna import svd_layers
from tests.conftest import tiny_bert


def _masked_model(seed=0):
    model = prepare_model(tiny_bert(), RankDynaConfig(ffn_groups="singular", attention_groups="singular"))
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(svd_layers(model).values()):
        layer.gate.copy_((torch.rand(layer.max_rank, generator=g) < 0.3).float())
        layer.s.data.mul_(torch.where(torch.rand(layer.max_rank, generator=g) < 0.2, -1.0, 1.0))  # signs survive
    first = next(iter(svd_layers(model).values()))
    first.gate.zero_()  # a rank-0 matrix: its output is its bias
    last = list(svd_layers(model).values())[-1]
    last.gate.fill_(1.0)  # full rank: cheaper dense
    return model


def test_export_keeps_predictions_and_hits_the_rank_pattern(tmp_path):
    model = _masked_model()
    ids = torch.randint(0, 128, (3, 10))
    layers = svd_layers(model)
    expected_ranks = {n: int(l.gate.sum()) for n, l in layers.items()}
    shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
    before = model(ids).logits

    modules = export_model(model)
    after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not svd_layers(model)
    for name, entry in modules.items():
        module = model.get_submodule(name)
        rank = expected_ranks[name]
        if rank * sum(shapes[name]) >= shapes[name][0] * shapes[name][1]:
            assert type(module) is nn.Linear and entry["type"] == "linear"
        else:
            assert isinstance(module, LowRankLinear) and module.rank == rank == entry["rank"]
    weights = sum(p.numel() for n, p in model.named_parameters()
                  if any(n.startswith(m + ".") for m in modules) and n.endswith("weight"))
    assert weights == sum(matrix_cost(expected_ranks[n], *shapes[n]) for n in modules)

    model.save_pretrained(str(tmp_path))  # export_model recorded the layout on model.config
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    torch.testing.assert_close(reloaded(ids).logits, after, atol=0, rtol=0)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "rankdyna" and saved["method"] == "rankdyna"
    assert saved["compressed_params"] == weights and saved["modules"] == modules
    assert saved["method_config"]["target_budget"] == 0.5
    assert read_compression_config(str(tmp_path))["modules"] == modules


def test_exported_layers_keep_a_weight_of_their_own_shape():
    # The output factor is stored as `weight`: T5-style code reading `.weight.dtype` works, and the dense
    # architecture cannot load it without a size mismatch.
    layer = LowRankLinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), torch.randn(6))
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "down.weight"]
    assert layer.weight.shape == (6, 2) and layer.down.weight.shape == (2, 5)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), x @ (layer.weight @ layer.down.weight).T + layer.bias)


def test_kept_dims_layers_trace_without_assigning_attributes():
    """torch.export (which the ONNX exporter runs) traces the kept-dims index as a graph constant: no module attribute
    is assigned while tracing (torch.export would warn and drop it), and the exported program computes the same."""
    import warnings

    from rankdyna_trainer.export import GatheredLinear, ScatteredLinear

    x = torch.randn(3, 6)
    for layer in (ScatteredLinear(6, [0, 2, 5], 8), GatheredLinear([1, 4], 6, 5)):
        torch.nn.init.normal_(layer.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            program = torch.export.export(layer, (x,))
        torch.testing.assert_close(program.module()(x), layer(x))
