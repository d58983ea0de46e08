"""Pieces shared by the post-hoc (compress-then-fine-tune) methods: svd, fwsvd, tfwsvd, ars.

Each of them picks, for every targeted matrix, a set of singular groups under the one global parameter
budget of :mod:`rankdyna_trainer.budget`, and replaces the matrix by the kept groups as a
:class:`~rankdyna_trainer.export.LowRankLinear` (or a dense ``Linear`` where that is no larger).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import allocate_groups, check_budget_fraction
from .export import describe_module, factorized_or_dense
from .quantizer import record_compression
from .targets import find_target_linears, is_conv1d, linear_weight, set_submodule, unwrap_model


@dataclass
class Factorization:
    """``W ~= left @ diag(s) @ right`` with groups ordered by ``s`` (largest first).

    ``left`` is ``out x k`` and ``right`` is ``k x in``; for weighted methods ``left`` need not be
    orthonormal. Keeping a subset of groups gives a low-rank approximation of the weight.
    """

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor

    def factors(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left', right')`` with ``left' @ right'`` the kept groups; each singular value is split evenly."""
        s = self.s[keep]
        root = s.abs().sqrt()
        return self.left[:, keep] * (root * s.sign()), root[:, None] * self.right[keep]

    def weight(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return (self.left * self.s) @ self.right
        left, right = self.factors(keep)
        return left @ right


def _thin_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Compression runs before the Trainer moves the model; a GPU, when there is one, does the SVDs far faster
    # (and per-process CPU SVDs of several processes sharing a node were seen to stall).
    if W.device.type == "cpu" and torch.cuda.is_available():
        return tuple(t.to(W.device) for t in torch.linalg.svd(W.cuda(), full_matrices=False))
    return torch.linalg.svd(W, full_matrices=False)


def svd_factorization(weight: torch.Tensor, input_rms: torch.Tensor | None = None) -> Factorization:
    """Thin SVD of ``weight``; with ``input_rms``, the activation-weighted SVD (LoRAP).

    Activation-weighted: the SVD is taken of ``W diag(input_rms)`` and the scaling undone on the right
    factor, so truncation error is measured on typical inputs and channels with large activations are
    approximated more closely.
    """
    W = weight.detach().float()
    if input_rms is None:
        return Factorization(*_thin_svd(W))
    # A dead channel would make the inverse scale blow up; floor it relative to the largest one.
    scale = input_rms.float().clamp_min(1e-6 * float(input_rms.max()) + 1e-12)
    U, s, Vh = _thin_svd(W * scale[None, :])
    return Factorization(U, s, Vh / scale[None, :])


def whitening(second_moment: torch.Tensor, damping: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)`` in float64 with ``S S^T = C + damping * mean(diag C) * I``, ``C`` the inputs' second moment.

    From the eigendecomposition ``C = Q diag(l) Q^T``: ``S = Q diag(sqrt(l))``. The ridge keeps every
    eigenvalue positive when ``C`` is singular (fewer calibration tokens than input channels, dead channels)
    or ill-conditioned, where a plain Cholesky factorization fails or its inverse blows up.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}.")
    C = second_moment.detach().double()
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"The second moment must be a square matrix, got shape {tuple(C.shape)}.")
    if not bool(torch.isfinite(C).all()):
        raise ValueError("The second moment of the calibration inputs is not finite; check the calibration data.")
    C = (C + C.T) / 2  # summation order can leave it slightly asymmetric
    scale = float(C.diagonal().mean())
    if scale <= 0:  # no input energy at all: every direction is equally (un)important
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        return eye, eye
    eigenvalues, Q = torch.linalg.eigh(C)
    # Rounding can leave a PSD matrix with tiny negative eigenvalues; the floor keeps the inverse bounded
    # even with damping=0.
    eigenvalues = eigenvalues.clamp_min(0) + max(damping, 1e-10) * scale
    root = eigenvalues.sqrt()
    return Q * root, (Q / root).T


def whitened_factorization(weight: torch.Tensor, second_moment: torch.Tensor, damping: float = 1e-2,
                           whitening_cache: dict | None = None) -> Factorization:
    """SVD of ``W S`` with ``S S^T`` the (damped) second moment of the layer's inputs, ``S`` undone on the right.

    For inputs ``x`` with ``E[x x^T] = S S^T``, the output error of any approximation ``W'`` is
    ``E||(W - W') x||^2 = ||(W - W') S||_F^2``. With ``W S = U diag(s) V'^T``, keeping groups and dropping the
    others therefore costs exactly the sum of the dropped ``s_i^2`` in output error (SVD-LLM's truncation-aware
    whitening): the groups are ordered by the output energy they carry. ``right = V'^T S^-1`` is not
    orthonormal; with every group kept, ``left diag(s) right = W`` exactly.

    ``whitening_cache`` (a dict, keyed by the second-moment tensor's identity) lets layers that share one
    second-moment tensor (q/k/v, gate/up of a block) share one eigendecomposition.
    """
    if whitening_cache is None:
        S, S_inv = whitening(second_moment, damping)
    else:
        if id(second_moment) not in whitening_cache:  # the tensor is kept with it, so its id stays unique
            whitening_cache[id(second_moment)] = (second_moment, whitening(second_moment, damping))
        S, S_inv = whitening_cache[id(second_moment)][1]
    W = weight.detach().double()
    if S.shape[0] != W.shape[1]:
        raise ValueError(f"The second moment is {S.shape[0]}x{S.shape[0]} but the weight has {W.shape[1]} inputs.")
    S, S_inv = S.to(W.device), S_inv.to(W.device)
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    return Factorization(U.float(), s.float(), (Vh @ S_inv).float())


def target_linears(model: nn.Module, target_modules) -> dict[str, nn.Module]:
    """The targeted ``nn.Linear``/``Conv1D`` layers; read their ``out x in`` weight with :func:`target_weight`."""
    return find_target_linears(model, target_modules)


def target_weight(layer: nn.Module) -> torch.Tensor:
    """The ``out x in`` weight of a targeted layer (``Conv1D`` stores it transposed)."""
    return linear_weight(layer)


def target_shapes(layers: dict[str, nn.Module]) -> list[tuple[int, int]]:
    return [tuple(target_weight(l).shape) for l in layers.values()]


def dense_params(shapes: list[tuple[int, int]]) -> int:
    return sum(m * n for m, n in shapes)


def budget_params(shapes: list[tuple[int, int]], budget: float) -> int:
    """The global budget in parameters: ``budget`` times the dense weights of the targeted matrices."""
    check_budget_fraction(budget, "The parameter budget")
    return int(budget * dense_params(shapes))


def uniform_rank_scores(shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Scores under which :func:`allocate_groups` gives every matrix the same rank.

    Group ``i`` of every matrix scores ``-i``; ties go to the matrices in model order, so the budget is
    filled with rank ``r`` everywhere and ``r + 1`` in the first matrices (ranks differ by at most one).
    """
    return [-torch.arange(min(m, n), dtype=torch.float32) for m, n in shapes]


def allocate(scores: list[torch.Tensor], shapes: list[tuple[int, int]], budget: float,
             rank_multiple: int = 1) -> list[torch.Tensor]:
    return allocate_groups(scores, shapes, budget_params(shapes, budget), rank_multiple=rank_multiple)


@torch.no_grad()
def replace_with_kept_groups(
    model: nn.Module, layers: dict[str, nn.Module], factorizations: list[Factorization], keep: list[torch.Tensor],
    method: str, method_config: dict | None = None,
) -> dict[str, dict]:
    """Swap each targeted layer (in place) for its kept groups; return the module layout, also recorded on
    ``model.config`` (see :func:`~rankdyna_trainer.quantizer.record_compression`) under ``method``."""
    modules = {}
    for (name, linear), fact, kept in zip(layers.items(), factorizations, keep):
        left, right = fact.factors(kept.to(fact.s.device))
        dtype = linear.weight.dtype
        bias = linear.bias.detach() if linear.bias is not None else None
        exported = factorized_or_dense(left.to(dtype).contiguous(), right.to(dtype).contiguous(), bias,
                                       conv1d=is_conv1d(linear))
        set_submodule(model, name, exported.to(linear.weight.device))
        modules[name] = describe_module(exported)
    return record_compression(model, modules, method, method_config)


def kept_ranks(layers: dict[str, nn.Linear], keep: list[torch.Tensor]) -> dict[str, int]:
    counts = torch.stack([k.sum() for k in keep]).tolist() if keep else []
    return dict(zip(layers, (int(c) for c in counts)))


def fisher_information(
    model: nn.Module, dataloader, layers: dict[str, nn.Module], max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Empirical Fisher of each targeted weight: the sum over batches of the squared loss gradient.

    Element-wise (``out x in``, transposed back for ``Conv1D``), as TFWSVD uses it; FWSVD sums it over each row.
    The model runs in eval mode (no dropout) and its parameters are left untouched; batches must carry labels.
    """
    if dataloader is None:
        raise ValueError("Fisher information needs a dataloader of labelled task batches; got None.")
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    weights = [l.weight for l in layers.values()]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    device = weights[0].device
    total = len(dataloader) if max_batches is None else min(max_batches, len(dataloader))
    seen = 0
    for batch in tqdm(dataloader, total=total, desc="Fisher information"):
        if seen >= total:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        if loss is None:
            raise ValueError("The model returned no loss: Fisher information needs batches with labels.")
        loss.backward()
        grads = [w.grad.float() if w.grad is not None else torch.zeros_like(f) for w, f in zip(weights, fisher)]
        torch._foreach_addcmul_(fisher, grads, grads)
        seen += 1
    model.zero_grad(set_to_none=True)
    for w, flag in zip(weights, flags):
        w.requires_grad_(flag)
    model.train(was_training)
    if seen == 0:
        raise ValueError("The dataloader yielded no batch; cannot estimate Fisher information.")
    return {name: f.T if is_conv1d(layer) else f for (name, layer), f in zip(layers.items(), fisher)}
