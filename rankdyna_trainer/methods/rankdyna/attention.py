"""Attention channels as groups (``RankDynaConfig(attention_groups='channels')``).

Per head ``h`` the attention logits use the bilinear form ``W_q^h^T W_k^h`` and the head's output the map
``W_o^h W_v^h``; each has rank ``<= head_dim``. An inner dimension shared by such a pair of matrices (a q/k or a v/o
*channel*) costs ``2 x hidden`` weights and carries a whole rank of the pair's product, where a singular group of one
matrix costs ``m + n`` for a rank of that matrix alone.

:func:`rotate_heads` first changes each head's basis exactly (``q'.k' = q.k``, ``W_o' W_v' = W_o W_v``, biases
included) so that the dims come ordered by the singular values of the pair's product; the channels are then those
dims. :func:`attention_channel_blocks` finds the attention layers that take them: BERT/RoBERTa-style self-attention
(separate ``query``/``key``/``value`` ``nn.Linear`` and ``attention.output.dense``); other attentions are refused,
never silently left to singular groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...targets import repeated_blocks, set_submodule, unwrap_model
from .layer import HeadChannelGatedLinear, OutputGatedLinear, channel_producer

# Model types whose self-attention is BERT's: separate query/key/value Linear layers, absolute positions, one key and
# value head per query head, and an output projection `attention.output.dense`.
SUPPORTED_MODEL_TYPES = ("bert", "roberta")
_WHY_NOT = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gemma", "gemma2", "gpt_neox"),
                    "rotary position embeddings (RoPE) rotate q and k in fixed planes at every position, which a "
                    "change of each head's basis does not commute with (and grouped-query attention shares each "
                    "key/value head among several query heads)"),
    "gpt2": "its fused c_attn computes query, key and value in one matrix",
}
# Relative tolerance below which a head's triangular factor counts as singular (its diagonal is floored there).
SINGULAR_DAMPING = 1e-6


@dataclass(frozen=True)
class AttentionBlock:
    """The four layers of one self-attention (full module names) and its head layout."""

    query: str
    key: str
    value: str
    output: str
    heads: int
    head_dim: int

    @property
    def names(self) -> tuple[str, str, str, str]:
        return self.query, self.key, self.value, self.output


def _refuse(model: nn.Module, why: str) -> ValueError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ValueError(
        f"attention_groups='channels' supports BERT/RoBERTa-style self-attention only (model types "
        f"{list(SUPPORTED_MODEL_TYPES)}: separate query/key/value nn.Linear layers and attention.output.dense, "
        f"absolute positions, one key/value head per query head); got model_type={model_type!r} "
        f"({type(model).__name__}): {why}. Use attention_groups='singular' or 'auto' for this model.")


def supports_channels(model: nn.Module) -> bool:
    """Whether ``model``'s type has BERT's self-attention layout (SUPPORTED_MODEL_TYPES)."""
    return getattr(getattr(unwrap_model(model), "config", None), "model_type", None) in SUPPORTED_MODEL_TYPES


def attention_channel_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> list[AttentionBlock]:
    """Every self-attention of ``model`` whose four layers are all in ``targets``; a ValueError for an architecture
    that is not BERT-style, or for a targeting that takes some of an attention's layers and not the others."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not supports_channels(model):
        raise _refuse(model, _WHY_NOT.get(model_type, "its attention layout is not known to be BERT's"))
    heads = config.num_attention_heads
    blocks = []
    for block_name, block in repeated_blocks(model).items():
        attention = getattr(block, "attention", None)
        attn_self, attn_out = getattr(attention, "self", None), getattr(attention, "output", None)
        layers = {part: getattr(attn_self, part, None) for part in ("query", "key", "value")}
        layers["output"] = getattr(attn_out, "dense", None)
        if not all(isinstance(layer, nn.Linear) for layer in layers.values()):
            raise _refuse(model, f"block {block_name!r} has no attention.self.query/key/value and "
                          "attention.output.dense nn.Linear layers")
        names = {part: f"{block_name}.attention.{'output.dense' if part == 'output' else 'self.' + part}"
                 for part in layers}
        targeted = [part for part, name in names.items() if name in targets]
        if not targeted:
            continue
        if len(targeted) < 4:
            raise ValueError(f"attention_groups='channels' prunes an attention's query/key/value/output layers "
                             f"together, but target_modules takes only {[names[p] for p in targeted]} of "
                             f"{list(names.values())}; target all four or none of them.")
        width = layers["query"].out_features
        head_dim = width // heads
        shapes_agree = (head_dim * heads == width == layers["key"].out_features == layers["value"].out_features
                        == layers["output"].in_features
                        and getattr(attn_self, "attention_head_size", head_dim) == head_dim
                        and layers["query"].in_features == layers["key"].in_features)
        if not shapes_agree:
            raise _refuse(model, f"block {block_name!r}'s query/key/value/output widths do not split into "
                          f"num_attention_heads={heads} equal heads")
        blocks.append(AttentionBlock(**names, heads=heads, head_dim=head_dim))
    if not blocks:
        raise ValueError("attention_groups='channels' found no self-attention whose query, key, value and "
                         "attention.output.dense layers are targeted (target_modules leaves them out); target them or "
                         "use attention_groups='singular'.")
    return blocks


def _floor_diagonal(r: torch.Tensor) -> torch.Tensor:
    """``r`` (upper triangular) with diagonal entries below ``SINGULAR_DAMPING`` times the largest floored to it,
    so it can be inverted; an exact change of basis needs it invertible, which every trained head's is."""
    diagonal = r.diagonal()
    floor = SINGULAR_DAMPING * float(diagonal.abs().max()) + torch.finfo(r.dtype).tiny
    sign = torch.where(diagonal < 0, -1.0, 1.0).to(r)
    return r + torch.diag_embed(torch.where(diagonal.abs() < floor, sign * floor - diagonal, 0.0))


def pair_transforms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``T_a``, ``T_b`` (``d x d``) for two ``d x n`` matrices whose bilinear form ``a^T b`` is to be kept:
    ``T_a^T T_b = I`` (so ``(T_a a)^T (T_b b) = a^T b``) and the rows of ``T_a a`` and ``T_b b`` are the singular
    directions of ``a^T b`` scaled by ``sqrt(sigma)``, largest first.

    With ``a^T = Q_a R_a``, ``b^T = Q_b R_b`` (QR) and ``R_a R_b^T = P S Q^T`` (SVD): ``T_a = S^1/2 P^T R_a^-T`` and
    ``T_b = S^1/2 Q^T R_b^-T``. Computed in float64.
    """
    a, b = a.double(), b.double()
    _, r_a = torch.linalg.qr(a.T)
    _, r_b = torch.linalg.qr(b.T)
    r_a, r_b = _floor_diagonal(r_a), _floor_diagonal(r_b)
    p, s, q_t = torch.linalg.svd(r_a @ r_b.T)
    root = s.sqrt()[:, None]
    # P^T R_a^-T = (R_a^-1 P)^T, solved on the triangular factor.
    t_a = root * torch.linalg.solve_triangular(r_a, p, upper=True).T
    t_b = root * torch.linalg.solve_triangular(r_b, q_t.T, upper=True).T
    return t_a, t_b


@torch.no_grad()
def rotate_heads(query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear, heads: int) -> None:
    """Change each head's basis in place, exactly: its query and key outputs (weights and biases) by ``T_q``, ``T_k``
    with ``T_q^T T_k = I``, so every logit ``q.k`` is unchanged; its value outputs by ``T_v`` and the output layer's
    columns of the head by ``T_v^-1``, so ``W_o W_v`` and the value bias's path are unchanged. Each head's dims then
    come ordered by the singular values of ``W_q^h^T W_k^h`` and ``W_o^h W_v^h``."""
    head_dim = query.out_features // heads
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        t_q, t_k = pair_transforms(query.weight[rows], key.weight[rows])
        t_o, t_v = pair_transforms(output.weight[:, rows].T, value.weight[rows])
        for layer, t in ((query, t_q), (key, t_k), (value, t_v)):
            layer.weight[rows] = (t @ layer.weight[rows].double()).to(layer.weight.dtype)
            if layer.bias is not None:
                layer.bias[rows] = (t @ layer.bias[rows].double()).to(layer.bias.dtype)
        output.weight[:, rows] = (output.weight[:, rows].double() @ t_o.T).to(output.weight.dtype)


def make_attention_channels(model: nn.Module, block: AttentionBlock) -> None:
    """Rotate one attention's heads and put in its channel layers: the query gates the q/k channels (the key is its
    producer), the output layer the v/o channels (the value is its producer). Key and value become
    :class:`~.layer.ScatteringProducerLinear` (``nn.Linear`` subclasses with the same parameters and state-dict keys),
    which compute only the kept rows on the kept-groups path."""
    query, key, value, output = (model.get_submodule(n) for n in block.names)
    rotate_heads(query, key, value, output, block.heads)
    set_submodule(model, block.query, OutputGatedLinear.from_linear(query, {block.key: key}))
    set_submodule(model, block.output, HeadChannelGatedLinear.from_linear(output, {block.value: value}))
    for name, producer in ((block.key, key), (block.value, value)):
        set_submodule(model, name, channel_producer(producer, scattering=True))
