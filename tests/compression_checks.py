"""Checks every compression method's tests share: budget accounting and a lossless save/reload."""

import torch
from torch.utils.data import DataLoader

from rankdyna_trainer import RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.export import exported_params
from rankdyna_trainer.methods.rankdyna import gated_layers
from rankdyna_trainer.quantizer import load_compressed_model, save_compressed_model
from rankdyna_trainer.targets import find_target_linears

from .conftest import random_classification_dataset


def task_dataloader(n: int = 64, batch_size: int = 16) -> DataLoader:
    dataset = random_classification_dataset(n=n).with_format("torch")
    return DataLoader(dataset, batch_size=batch_size)


def targeted_dense_params(model) -> int:
    return sum(l.weight.numel() for l in find_target_linears(model).values())


def assert_budget_met(modules: dict, dense: int, budget: float) -> None:
    """Exported weights at most the budget and within 1% of it (the budget is a fraction of ``dense``)."""
    total = sum(exported_params(e) for e in modules.values())
    target = int(budget * dense)
    assert total <= target
    assert total >= 0.99 * target, f"{total} params is more than 1% under the budget {target}"


def assert_reloads_identically(model, modules: dict, method: str, directory) -> None:
    save_compressed_model(model, str(directory), modules, method)
    reloaded = load_compressed_model(str(directory))
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def cut_and_export(model, rank: int = 4, attention_groups: str = "singular"):
    """``model`` prepared with the defaults but ``attention_groups`` (singular groups: exported as ``LowRankLinear``,
    the layout every SVD method and decoder shares; ``'auto'``: BERT's per-head channels, ``ScatteredLinear`` /
    ``GatheredLinear``), every attention matrix cut to ``rank`` groups (or channels) and every FFN to ``rank``
    channels, exported (a stand-in for a trained run)."""
    prepare_model(model, RankDynaConfig(attention_groups=attention_groups))
    for layer in gated_layers(model).values():
        layer.gate[rank:] = 0
    export_model(model)
    return model.eval()
