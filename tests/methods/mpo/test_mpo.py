import itertools
import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from rankdyna_trainer.export import exported_params
from rankdyna_trainer.methods.mpo import (
    MPOConfig,
    MPOLinear,
    balanced_factors,
    bond_for_budget,
    export_mpo,
    mpo_bonds,
    mpo_contract,
    mpo_decompose,
    mpo_layers,
    mpo_params,
    prepare_mpo,
)
from rankdyna_trainer.quantizer import load_compressed_model, save_compressed_model
from rankdyna_trainer.targets import find_target_linears
from tests.conftest import tiny_llama


@pytest.mark.parametrize("n,count", [(576, 3), (1536, 3), (192, 5), (64, 3), (7, 3), (1, 3)])
def test_balanced_factors_multiply_to_n_with_largest_in_the_middle(n, count):
    factors = balanced_factors(n, count)
    assert len(factors) == count and math.prod(factors) == n
    assert factors[count // 2] == max(factors)


def test_contraction_matches_elementwise_matrix_product():
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 2, 3, 4), (4, 3, 2, 5), (5, 2, 2, 1)]
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    W = mpo_contract(tensors)
    assert W.shape == (12, 12)
    # W[(o1,o2,o3), (i1,i2,i3)] = T1[:, o1, i1, :] @ T2[:, o2, i2, :] @ T3[:, o3, i3, :], row-major indices.
    for o in itertools.product(range(2), range(3), range(2)):
        for i in itertools.product(range(3), range(2), range(2)):
            chain = tensors[0][:, o[0], i[0], :] @ tensors[1][:, o[1], i[1], :] @ tensors[2][:, o[2], i[2], :]
            row, col = (o[0] * 3 + o[1]) * 2 + o[2], (i[0] * 2 + i[1]) * 2 + i[2]
            assert W[row, col].item() == pytest.approx(chain.item())


@pytest.mark.parametrize("num_tensors", [3, 5])
@pytest.mark.parametrize("shape", [(64, 32), (48, 96), (32, 32)])
def test_full_bond_mpo_reproduces_the_weight(num_tensors, shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tensors = mpo_decompose(W, balanced_factors(shape[0], num_tensors), balanced_factors(shape[1], num_tensors))
    torch.testing.assert_close(mpo_contract(tensors), W)
    center = num_tensors // 2
    assert tensors[center].numel() == max(t.numel() for t in tensors)
    # Auxiliary tensors are isometries: every singular value sits in the central tensor.
    for k, t in enumerate(tensors[:center]):
        m = t.reshape(-1, t.shape[-1])
        torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1], dtype=m.dtype))


@pytest.mark.parametrize("max_bond", [None, 1, 2, 3, 5, 8, 100])
def test_bond_prediction_matches_decomposition(max_bond):
    for shape, K in (((64, 32), 3), ((48, 96), 5), ((576, 192), 3)):
        of, inf = balanced_factors(shape[0], K), balanced_factors(shape[1], K)
        tensors = mpo_decompose(torch.randn(shape), of, inf, max_bond)
        assert mpo_bonds(of, inf, max_bond) == [t.shape[-1] for t in tensors[:-1]]
        assert mpo_params(of, inf, mpo_bonds(of, inf, max_bond)) == sum(t.numel() for t in tensors)


def test_truncation_error_shrinks_as_bonds_grow():
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    of = inf = balanced_factors(64, 3)
    errors = [torch.linalg.norm(mpo_contract(mpo_decompose(W, of, inf, b)) - W).item() for b in (2, 8, 32, 64)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_bond_for_budget_is_largest_fitting_cap(budget):
    m, n = 576, 192
    of, inf = balanced_factors(m, 3), balanced_factors(n, 3)
    fits = [b for b in range(1, 400) if mpo_params(of, inf, mpo_bonds(of, inf, b)) <= budget * m * n]
    assert bond_for_budget(m, n, 3, budget * m * n) == max(fits)


def _lm_dataset(n=16, length=12):
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(4))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def test_prepare_train_export_reload_on_tiny_llama(tmp_path):
    model = tiny_llama()
    dense = sum(l.weight.numel() for l in find_target_linears(model).values())
    config = MPOConfig(target_budget=0.5)
    prepare_mpo(model, config)
    layers = mpo_layers(model)
    assert len(layers) == 14
    assert sum(l.num_params() for l in layers.values()) <= 0.5 * dense
    central = {n: l.tensors[l.center].detach().clone() for n, l in layers.items()}
    auxiliary = {n: [t.detach().clone() for t in l.auxiliary_tensors()] for n, l in layers.items()}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=_lm_dataset()).train()
    for name, layer in layers.items():
        assert torch.equal(layer.tensors[layer.center], central[name])  # frozen
    assert any(not torch.equal(t, old)
               for n, l in layers.items() for t, old in zip(l.auxiliary_tensors(), auxiliary[n]))

    modules = export_mpo(model)
    assert sum(exported_params(e) for e in modules.values()) == sum(l.num_params() for l in layers.values())
    save_compressed_model(model, str(tmp_path / "saved"), modules, "mpo", config.__dict__)
    reloaded = load_compressed_model(str(tmp_path / "saved"))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_train_central_unfreezes_it_and_a_larger_budget_approximates_better():
    reference = tiny_llama()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        target = reference(input_ids=ids).logits
    errors = []
    for budget in (0.3, 0.6, 1.0):
        model = prepare_mpo(tiny_llama(), MPOConfig(target_budget=budget, train_central=True))
        assert all(l.tensors[l.center].requires_grad for l in mpo_layers(model).values())
        with torch.no_grad():
            errors.append((model(input_ids=ids).logits - target).abs().max().item())
    assert errors == sorted(errors, reverse=True)


def test_bad_inputs_fail_early():
    with pytest.raises(ValueError, match="num_tensors"):
        MPOConfig(num_tensors=4)
    with pytest.raises(ValueError, match="target_budget"):
        MPOConfig(target_budget=1.5)
    with pytest.raises(ValueError, match="do not multiply"):
        mpo_decompose(torch.randn(6, 6), [2, 3, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="odd number"):
        MPOLinear([torch.zeros(1, 2, 2, 1)] * 2, None)
    with pytest.raises(ValueError, match="prepare_mpo"):
        export_mpo(tiny_llama())


def test_mpo_type_is_registered_by_importing_the_package_alone():
    # A fresh interpreter that only loads the export module must still know how to rebuild MPO layers.
    import subprocess
    import sys
    from pathlib import Path

    code = "from rankdyna_trainer.export import MODULE_BUILDERS; assert 'mpo' in MODULE_BUILDERS"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
