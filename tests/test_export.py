import json

import pytest
import torch
from torch import nn

from rankdyna_trainer import (
    LowRankLinear,
    RankDynaConfig,
    export_model,
    load_compressed_model,
    prepare_model,
    save_compressed_model,
)
from rankdyna_trainer.budget import matrix_cost
from rankdyna_trainer.export import COMPRESSION_CONFIG_FILE
from rankdyna_trainer.methods.rankdyna import svd_layers
from tests.conftest import tiny_bert


def _masked_model(seed=0):
    model = prepare_model(tiny_bert(), RankDynaConfig())
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

    save_compressed_model(model, str(tmp_path), modules, method="rankdyna")
    reloaded = load_compressed_model(str(tmp_path))
    torch.testing.assert_close(reloaded(ids).logits, after, atol=0, rtol=0)
    saved = json.loads((tmp_path / COMPRESSION_CONFIG_FILE).read_text())
    assert saved["compressed_params"] == weights


def test_loading_a_folder_without_layout_or_with_a_corrupt_one_is_clear(tmp_path):
    model = _masked_model()
    modules = export_model(model)
    with pytest.raises(FileNotFoundError, match="not a model saved by save_compressed_model"):
        load_compressed_model(str(tmp_path))
    save_compressed_model(model, str(tmp_path), modules, method="rankdyna")
    layout = json.loads((tmp_path / COMPRESSION_CONFIG_FILE).read_text())
    name = next(iter(layout["modules"]))
    layout["modules"][name]["type"] = "mystery"
    (tmp_path / COMPRESSION_CONFIG_FILE).write_text(json.dumps(layout))
    with pytest.raises(ValueError, match="unknown type 'mystery'"):
        load_compressed_model(str(tmp_path))
