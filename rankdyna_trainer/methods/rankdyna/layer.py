from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...export import scatter_kept
from ...factorize import svd_factorization
from ...targets import linear_weight

FACTOR_SCALINGS = ("none", "matrix", "group")


def factor_step_scale(s: torch.Tensor, out_features: int, in_features: int, scaling: str) -> torch.Tensor:
    """Per-group multiplier ``a`` of the factors (``U = U_param * a``, ``V = a * V_param``), which sets how far one
    Adam step on the factors moves the weight.

    Adam moves every parameter element by about the learning rate, whatever its gradient's size. A step on ``U`` or
    ``V`` changes ``W = U diag(s) V`` by that much times ``s_i``, so at the same learning rate the factorized model
    moves ``||W||_F / sqrt(n) + ||W||_F / sqrt(m)`` times as far as dense training (2.4x to 4x on MiniLM), most of
    it along the top singular directions. With the multiplier, a step on the stored parameter is ``a`` times as
    large on the factor, and ``a`` is chosen to undo that:

    * ``"none"``: ``a = 1`` (plain factorized training, as before);
    * ``"matrix"``: one ``a`` per matrix, ``sqrt(mn) / ((sqrt(m) + sqrt(n)) ||W||_F)``, so a step moves ``W`` as
      far (Frobenius norm) as a dense Adam step;
    * ``"group"``: ``a_i = sqrt(mn) / ((sqrt(m) + sqrt(n)) sqrt(r) max(s_i, s_floor))``, the same total step
      spread evenly over the singular directions instead of in proportion to ``s_i`` (with plain SGD this makes
      the factorized step the dense step projected on the factors' tangent space). ``s_floor`` is 1 % of the
      largest singular value, so near-null directions do not get huge steps.
    """
    m, n = out_features, in_features
    if scaling == "none":
        return torch.ones_like(s)
    dense_step = (m * n) ** 0.5 / (m ** 0.5 + n ** 0.5)
    if scaling == "matrix":
        return torch.full_like(s, dense_step / max(float(s.norm()), torch.finfo(s.dtype).tiny))
    if scaling == "group":
        floor = 0.01 * float(s.abs().max()) + torch.finfo(s.dtype).tiny
        return dense_step / (len(s) ** 0.5 * s.abs().clamp_min(floor))
    raise ValueError(f"factor_scaling must be one of {FACTOR_SCALINGS}, got {scaling!r}.")


def register_gate(module: nn.Module, like: torch.Tensor) -> None:
    """The 0/1 ``gate`` over a layer's groups (set by the allocation), the gradient reaching it during the current
    optimizer step (``gate_grad``) and its smoothed square (``gate_fisher``, the group's Fisher score)."""
    module.register_buffer("gate", torch.ones_like(like))
    module.register_buffer("gate_grad", torch.zeros_like(like), persistent=False)
    module.register_buffer("gate_fisher", torch.zeros_like(like))
    # Whether a training step wants the gate's gradient (RankDynaCallback turns it off on the steps that do not
    # score), and whether every group is kept (set by rankdyna.kept_compute while it manages the gates).
    module.gate_scored = True
    module.all_groups_kept = False


def gate_for_forward(module: nn.Module, kept_only: bool = False) -> torch.Tensor | None:
    """The gate as this forward applies it. While a training step scores it (``module.gate_scored``): a fresh leaf
    whose gradient is summed into ``module.gate_grad``, so gradient accumulation over micro-batches adds up exactly
    like parameter gradients do. Otherwise the 0/1 buffer, or None where it could only multiply by ones: every group
    kept (``module.all_groups_kept``), or only the kept groups computed (``kept_only``; their gates are exactly 1).
    Skipping those multiplies changes no value and saves three weight-sized passes per layer and step (5 % of a
    full-size MiniLM step on 32 x 12 batches, nothing measurable on 32 x 64: docs/cost.md)."""
    if torch.is_grad_enabled() and module.training and module.gate_scored:
        gate = module.gate.detach().requires_grad_(True)
        gate.register_hook(lambda grad: module.gate_grad.add_(grad.to(module.gate_grad.dtype)))
        return gate
    return None if kept_only or module.all_groups_kept else module.gate


class _GatherKept(torch.autograd.Function):
    """``x.index_select(dim, index)`` for unique ``index``, whose backward copies the gradient into place.

    The built-in backward accumulates with ``scatter_add_`` over an expanded index, several times slower on the CPU
    than a copy, and this runs for every gathered parameter on every step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.dim, ctx.shape = dim, x.shape
        return x.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_copy_(ctx.dim, index, grad), None, None


def gather_kept(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """The kept slices (``index``, unique) of ``x`` along ``dim``; a parameter's gradient goes back in place."""
    return _GatherKept.apply(x, dim, index) if x.requires_grad else x.index_select(dim, index)


class SVDLinear(nn.Module):
    """A linear layer trained in factorized form ``W = U diag(s * gate) V``.

    ``U`` (out x r), ``s`` (r) and ``V`` (r x in); ``gate`` is a 0/1 buffer over singular groups set by the
    allocation. The stored parameters are ``U / a`` and ``V / a`` with ``a`` the fixed per-group ``factor_scale``
    buffer (see :func:`factor_step_scale`): the factors themselves are :meth:`left` and :meth:`right`. Masked
    groups keep their ``s``, so a group that is given back later resumes from its value instead of from zero. The
    gradient of the loss with respect to the gate is accumulated in ``gate_grad``: for a kept group it equals
    ``s_i * dL/ds_i`` (AdaLoRA's sensitivity of the singular value), and for a masked group it is the first-order
    change in loss from re-adding it, which keeps masked groups' scores informative.

    With ``trainable_rank`` k < r, only the leading k groups' factors train (parameters ``U``, ``V``); the other
    groups' factors are frozen buffers ``U_frozen``, ``V_frozen``. Every ``s`` and gate still trains and is scored,
    so the frozen groups are kept or pruned like the others: the layer starts exact at full rank while its
    gradient and optimizer state cost only what the k trainable groups cost.

    The importance statistics live here as buffers so that Trainer checkpoints carry them and a resumed run
    continues with the same scores. Element-wise statistics of ``U`` and ``V`` (trainable part) exist only when
    ``element_statistics`` (the ``sensitivity`` importance needs them; the ``fisher`` one does not).
    """

    # Set for a layer made from a transformers Conv1D, so that a dense export restores that module type.
    exports_as_conv1d = False
    # Kept groups of the trainable and the frozen part (index tensors), set by rankdyna.kept_compute while
    # training; None multiplies every group by its gate (the scoring path, and the only path outside training).
    kept_index: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None,
                 factor_scale: torch.Tensor | None = None, element_statistics: bool = True,
                 trainable_rank: int | None = None):
        super().__init__()
        self.out_features, self.in_features = U.shape[0], V.shape[1]
        rank = s.shape[0]
        k = rank if trainable_rank is None else max(1, min(int(trainable_rank), rank))
        scale = torch.ones_like(s) if factor_scale is None else factor_scale.to(s.dtype)
        self.register_buffer("factor_scale", scale[:k].clone())
        self.U = nn.Parameter(U[:, :k] / self.factor_scale)
        self.s = nn.Parameter(s)
        self.V = nn.Parameter(V[:k] / self.factor_scale[:, None])
        if k < rank:
            self.register_buffer("U_frozen", U[:, k:].detach().clone().contiguous())
            self.register_buffer("V_frozen", V[k:].detach().clone().contiguous())
        self.bias = nn.Parameter(bias) if bias is not None else None
        register_gate(self, s)
        if element_statistics:
            for part, like in (("U", self.U), ("V", self.V), ("gate", s)):
                self.register_buffer(f"sensitivity_{part}", torch.zeros_like(like, requires_grad=False))
                self.register_buffer(f"uncertainty_{part}", torch.zeros_like(like, requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear | Conv1D, rank: int | None = None, factor_scaling: str = "none",
                    element_statistics: bool = True, trainable_rank: int | None = None) -> "SVDLinear":
        weight = linear_weight(linear).detach()
        factorization = svd_factorization(weight)
        U, s, Vh = factorization.left, factorization.s, factorization.right
        scale = factor_step_scale(s, weight.shape[0], weight.shape[1], factor_scaling)
        if rank is not None:
            U, s, Vh, scale = U[:, :rank], s[:rank], Vh[:rank], scale[:rank]
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        layer = cls(U.to(weight).contiguous(), s.to(weight), Vh.to(weight).contiguous(), bias, scale,
                    element_statistics, trainable_rank)
        layer.exports_as_conv1d = isinstance(linear, Conv1D)
        return layer

    @property
    def max_rank(self) -> int:
        return self.s.shape[0]

    @property
    def trainable_rank(self) -> int:
        return self.U.shape[1]

    @property
    def has_element_statistics(self) -> bool:
        return hasattr(self, "sensitivity_U")

    def extra_repr(self) -> str:
        frozen = f", trainable_rank={self.trainable_rank}" if self.trainable_rank < self.max_rank else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, max_rank={self.max_rank}{frozen}"

    def _factor_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(left, right)`` of the trainable groups, then of the frozen ones (if any)."""
        pairs = [(self.U * self.factor_scale, self.factor_scale[:, None] * self.V)]
        if self.trainable_rank < self.max_rank:
            pairs.append((self.U_frozen, self.V_frozen))
        return pairs

    def left(self) -> torch.Tensor:
        return torch.cat([left for left, _ in self._factor_pairs()], dim=1)

    def right(self) -> torch.Tensor:
        return torch.cat([right for _, right in self._factor_pairs()], dim=0)

    @property
    def full_rank(self) -> int:
        """Groups of the dense matrix, ``min(m, n)`` (``max_rank`` may be fewer: ``init_rank``, a truncated start)."""
        return min(self.out_features, self.in_features)

    @property
    def group_cost(self) -> int:
        return self.out_features + self.in_features

    @property
    def full_cost(self) -> int:
        return self.out_features * self.in_features

    def effective_weight(self) -> torch.Tensor:
        return (self.left() * (self.s * self.gate)) @ self.right()

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` weight the gates currently keep, detached: for code that reads ``.weight``
        (T5's feed-forward reads ``wo.weight.dtype``). Training goes through ``forward``, never through this."""
        with torch.no_grad():
            return self.effective_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = gate_for_forward(self, kept_only=self.kept_index is not None)
        s_eff = self.s if gate is None else self.s * gate
        sizes = [self.trainable_rank, self.max_rank - self.trainable_rank]
        pairs = self._factor_pairs() if self.kept_index is None else self._kept_pairs()
        parts = s_eff.split(sizes) if self.kept_index is None else [
            part.index_select(0, index) for part, index in zip(s_eff.split(sizes), self.kept_index)]
        return _factorized_linear(x, pairs, parts, self.bias)

    def _kept_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(left, right)`` of the kept groups only, gathered before scaling so the work is the kept rank's."""
        kept_trainable, kept_frozen = self.kept_index
        scale = self.factor_scale.index_select(0, kept_trainable)
        left, right = gather_kept(self.U, 1, kept_trainable), gather_kept(self.V, 0, kept_trainable)
        pairs = [(left * scale, scale[:, None] * right)]
        if self.trainable_rank < self.max_rank:
            pairs.append((self.U_frozen.index_select(1, kept_frozen), self.V_frozen.index_select(0, kept_frozen)))
        return pairs

    def orthogonality_penalty(self) -> torch.Tensor:
        eye = torch.eye(self.max_rank, device=self.U.device, dtype=self.U.dtype)
        U, V = self.left(), self.right()
        return torch.linalg.matrix_norm(U.T @ U - eye) + torch.linalg.matrix_norm(V @ V.T - eye)


def _factorized_linear(x: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]], parts: list[torch.Tensor],
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (sum_k U_k diag(p_k) V_k)^T + bias``, through the materialized weight or through the factors, whichever
    costs fewer multiplies for this batch (chosen from static shapes: no host sync)."""
    m, n = pairs[0][0].shape[0], pairs[0][1].shape[1]
    tokens, rank = x.numel() // n, sum(U.shape[1] for U, _ in pairs)
    if tokens * rank * (m + n) > m * rank * n + tokens * m * n:
        weight = sum((U * part) @ V for (U, V), part in zip(pairs, parts))
        return F.linear(x, weight, bias)
    # Per part rather than on concatenated factors, so autograd does not keep a copy of the frozen ones; the singular
    # values scale U's columns, not the activations, so autograd keeps an m x r factor instead of a tokens x r one.
    out = None
    for (U, V), part in zip(pairs, parts):
        y = F.linear(F.linear(x, V), U * part)
        out = y if out is None else out + y
    return out if bias is None else out + bias


class ChannelGroups(nn.Module):
    """A layer whose groups are *channels*: inner dimensions written by some layers and read by others, each kept or
    removed whole by one 0/1 gate (FFN intermediate channels; attention_groups='channels': per-head q/k and v/o dims).

    Shared by every channel kind: the gate and its statistics (:func:`register_gate`), the other layers writing or
    reading the channels (``producers``, full module names: sliced with this one at export), and the cost a channel
    claims from the budget (``group_cost``: its weights in every layer that writes or reads it; the layer's full cost
    is the sum over its channels, so there is no break-even before every channel is kept). The gate's gradient is
    ``sum_tokens h_j dL/dh_j`` for the gated activation ``h_j`` and its smoothed square the channel's Fisher score,
    in the same units as a singular group's. Subclasses say where the gate sits and how the kept channels export.
    """

    exports_as_conv1d = False
    # Whether the kept-groups path (rankdyna.kept_compute) applies; layers without one run gated on every step.
    computes_kept = True
    # Kept channels while training (set by rankdyna.kept_compute, with the producers'); None: every channel.
    kept_index: torch.Tensor | None = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, producers: list[str], group_cost: int,
                 channels: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.producers = list(producers)
        self.group_cost = int(group_cost)
        register_gate(self, weight.new_ones(channels))

    @property
    def max_rank(self) -> int:
        return self.gate.numel()

    @property
    def full_rank(self) -> int:
        return self.gate.numel()

    @property
    def full_cost(self) -> int:
        return self.group_cost * self.gate.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, channels={self.max_rank}, "
                f"channel_cost={self.group_cost}, producers={self.producers}")

    def gated_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense ``out x in`` weight and bias with the masked channels zeroed (the distillation teacher's)."""
        raise NotImplementedError

    def exported(self, model: nn.Module, name: str) -> dict[str, nn.Module]:
        """The modules (by full name: this layer, ``name``, and its producers) that hold the kept channels."""
        raise NotImplementedError


class ChannelGatedLinear(ChannelGroups):
    """An FFN's output layer with a 0/1 gate on each of its input channels, the FFN's intermediate channels.

    RankDyna's structured groups: masking channel ``j`` here removes it from the whole FFN, since the input layers
    (``producers``, full module names) write it only for this layer to read. A channel costs ``group_cost``
    weights: its column here plus its row in every producer. At export the kept channels' columns (here) and rows
    (producers) are sliced out as smaller dense layers.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, producers: list[str], group_cost: int):
        super().__init__(weight, bias, producers, group_cost, channels=weight.shape[1])

    @classmethod
    def from_linear(cls, linear: nn.Linear | Conv1D, producers: dict[str, nn.Module]) -> "ChannelGatedLinear":
        weight = linear_weight(linear).detach().clone()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        cost = weight.shape[0] + sum(linear_weight(p).shape[1] for p in producers.values())
        layer = cls(weight, bias, list(producers), cost)
        layer.exports_as_conv1d = isinstance(linear, Conv1D)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gate scales the weight's columns rather than the activations: autograd then keeps a weight-sized
        # tensor instead of a copy of the tokens x channels input.
        every_channel = x.shape[-1] == self.in_features  # else the producers computed the kept channels only
        gate = gate_for_forward(self, kept_only=not every_channel)
        weight = self.weight if every_channel else gather_kept(self.weight, 1, self.kept_index)
        if gate is not None:
            gate = gate.to(self.weight.dtype)
            weight = weight * (gate if every_channel else gate.index_select(0, self.kept_index))
        return F.linear(x, weight, self.bias)

    def gated_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight * self.gate.to(self.weight), self.bias

    @torch.no_grad()
    def exported(self, model: nn.Module, name: str) -> dict[str, nn.Module]:
        from ...export import dense_layer, sliced_linear

        kept = self.gate.nonzero().flatten()
        bias = self.bias.detach() if self.bias is not None else None
        modules = {p: sliced_linear(model.get_submodule(p), kept, dim=0) for p in self.producers}
        modules[name] = dense_layer(self.weight.detach().index_select(1, kept), bias, conv1d=self.exports_as_conv1d)
        return modules


class HeadChannelGatedLinear(ChannelGatedLinear):
    """An attention's output layer (BERT's ``attention.output.dense``) with v/o channels (attention_groups='channels').

    The same layer as the FFN reader: a gate on input column ``j`` removes value dim ``j``, since attention mixes
    tokens linearly in each dim (``sum_t a_t (v_t g) = (sum_t a_t v_t) g``), so the gate's gradient is that of a gate
    on the value output. A channel costs its column here and its row of ``value`` (the producer). Only the export
    differs: the attention code reshapes the value into ``heads x head_dim``, so ``value`` keeps its width (its kept
    rows scattered into place, :class:`~rankdyna_trainer.export.ScatteredLinear`) and this layer reads only the kept
    dims (:class:`~rankdyna_trainer.export.GatheredLinear`). The kept-groups path is the same in training: the value
    (a :class:`ScatteringProducerLinear`) computes its kept rows into the full width, and this layer reads only the
    kept columns of its full-width input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input is full width on both paths (the attention code needs heads x head_dim), so kept_index decides.
        kept = self.kept_index
        if kept is None:
            return super().forward(x)
        gate = gate_for_forward(self, kept_only=True)
        weight = gather_kept(self.weight, 1, kept)
        if gate is not None:
            weight = weight * gate.to(self.weight.dtype).index_select(0, kept)
        return F.linear(gather_kept(x, x.dim() - 1, kept), weight, self.bias)

    @torch.no_grad()
    def exported(self, model: nn.Module, name: str) -> dict[str, nn.Module]:
        from ...export import gathered_linear, scattered_linear

        kept = self.gate.nonzero().flatten()
        modules = {p: scattered_linear(model.get_submodule(p), kept) for p in self.producers}
        modules[name] = gathered_linear(self.weight.detach(), self.bias, kept)
        return modules


class OutputGatedLinear(ChannelGroups):
    """A linear layer with a 0/1 gate on each of its outputs: an attention's ``query`` with q/k channels
    (attention_groups='channels').

    Gating query dim ``j`` removes the term ``q_j k_j`` from every attention logit of its head, so the key's dim ``j``
    (the producer ``key`` writes it) is then unused too: a channel costs its row here and its row of ``key``. The gate
    scales the weight's rows and the bias (``y_j = g_j (W_j x + b_j)``), not the activations. At export the query
    and the key keep their kept rows, scattered into the full ``heads x head_dim`` width
    (:class:`~rankdyna_trainer.export.ScatteredLinear`). With ``kept_index`` set (rankdyna.kept_compute) training does
    the same: this layer and the key (a :class:`ScatteringProducerLinear`) compute only the kept rows and scatter them
    into a zero tensor of the full width; the attention products themselves keep the full width.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, producers: list[str], group_cost: int):
        super().__init__(weight, bias, producers, group_cost, channels=weight.shape[0])

    @classmethod
    def from_linear(cls, linear: nn.Linear, producers: dict[str, nn.Module]) -> "OutputGatedLinear":
        weight = linear_weight(linear).detach().clone()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        cost = weight.shape[1] + sum(linear_weight(p).shape[1] for p in producers.values())
        return cls(weight, bias, list(producers), cost)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.kept_index
        gate = gate_for_forward(self, kept_only=kept is not None)
        weight, bias = (self.weight, self.bias) if kept is None else (
            gather_kept(self.weight, 0, kept), None if self.bias is None else gather_kept(self.bias, 0, kept))
        if gate is not None:
            gate = gate.to(self.weight.dtype)
            gate = gate if kept is None else gate.index_select(0, kept)
            weight, bias = weight * gate[:, None], None if bias is None else bias * gate
        out = F.linear(x, weight, bias)
        return out if kept is None else scatter_kept(out, kept, self.out_features)

    def gated_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate = self.gate.to(self.weight)
        return self.weight * gate[:, None], None if self.bias is None else self.bias * gate

    @torch.no_grad()
    def exported(self, model: nn.Module, name: str) -> dict[str, nn.Module]:
        from ...export import scattered_linear

        kept = self.gate.nonzero().flatten()
        modules = {p: scattered_linear(model.get_submodule(p), kept) for p in self.producers}
        modules[name] = scattered_linear(self, kept)
        return modules


class ChannelProducerLinear(nn.Linear):
    """An FFN input layer (``up``/``gate``/``intermediate``) of a channel-gated FFN. While the reader keeps only some
    channels it computes only those rows (``kept_index``, set together with the reader's), so a pruned FFN costs its
    kept channels in training; with ``kept_index`` None it is the plain layer. Same parameters and state-dict keys."""

    kept_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept_index is None:
            return super().forward(x)
        bias = None if self.bias is None else gather_kept(self.bias, 0, self.kept_index)
        return F.linear(x, gather_kept(self.weight, 0, self.kept_index), bias)


class ScatteringProducerLinear(nn.Linear):
    """An attention projection that writes channels of a layer with a kept-groups path: the ``key`` of an
    :class:`OutputGatedLinear` query, the ``value`` of a :class:`HeadChannelGatedLinear` output. With ``kept_index``
    set (together with its reader's) it computes only the kept rows and scatters them into a zero tensor of its full
    width, which the attention code reshapes into ``heads x head_dim``; with ``kept_index`` None it is the plain
    layer. Same parameters and state-dict keys as the ``nn.Linear`` it replaces."""

    kept_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.kept_index
        if kept is None:
            return super().forward(x)
        bias = None if self.bias is None else gather_kept(self.bias, 0, kept)
        return scatter_kept(F.linear(x, gather_kept(self.weight, 0, kept), bias), kept, self.out_features)


class ChannelProducerConv1D(Conv1D):
    """:class:`ChannelProducerLinear` for transformers' ``Conv1D`` (GPT-2's ``c_fc``: weight stored ``in x out``)."""

    kept_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept_index is None:
            return super().forward(x)
        out = torch.addmm(gather_kept(self.bias, 0, self.kept_index), x.reshape(-1, x.shape[-1]),
                          gather_kept(self.weight, 1, self.kept_index))
        return out.view(*x.shape[:-1], -1)


def channel_producer(layer: nn.Module, scattering: bool = False) -> nn.Module:
    """``layer`` (an ``nn.Linear`` or ``Conv1D``) as its channel-producing subclass, holding the same parameters;
    ``scattering``: an attention projection (``nn.Linear`` only) whose kept rows go back into its full width."""
    if scattering and not isinstance(layer, nn.Linear):
        raise TypeError(f"A scattering producer replaces an nn.Linear, got {type(layer).__name__}.")
    cls = ScatteringProducerLinear if scattering else (
        ChannelProducerConv1D if isinstance(layer, Conv1D) else ChannelProducerLinear)
    with torch.device("meta"):  # no allocation nor init: the parameters are moved over below
        producer = cls(layer.nf, layer.nx) if cls is ChannelProducerConv1D else cls(
            layer.in_features, layer.out_features, bias=layer.bias is not None)
    producer.weight, producer.bias = layer.weight, layer.bias
    producer.train(layer.training)
    return producer
