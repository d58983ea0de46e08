"""Turning a pre-trained model into its factorized, trainable RankDyna form."""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ...calibration import blockwise, first_batches
from ...factorize import Factorization, svd_factorization, whitened_factorization
from ...targets import (
    ffn_channel_layers,
    find_target_linears,
    is_conv1d,
    linear_shape,
    linear_weight,
    set_submodule,
    unwrap_model,
)
from .attention import AttentionBlock, attention_channel_blocks, make_attention_channels, supports_channels
from .config import RankDynaConfig
from .defaults import AUTO, article, describe, model_kind, resolve_model_kind
from .layer import ChannelGatedLinear, ChannelGroups, SVDLinear, channel_producer, factor_step_scale

logger = logging.getLogger(__name__)


def prepare_model(model: nn.Module, config: RankDynaConfig,
                  calibration_batches: Iterable[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Replace every targeted ``nn.Linear``/``Conv1D`` of ``model`` (in place) by an :class:`SVDLinear` of its weight.

    ``config.init="whitened"`` factorizes each weight in the whitened basis of its inputs, measured on
    ``calibration_batches`` (token batches such as ``{"input_ids": ...}``; labels are ignored) block by block.
    ``model`` may be wrapped by ``torch.compile``; the returned object is the one passed in.

    The config's model-kind ``'auto'`` fields are resolved here for ``model`` (logged in one INFO line); the
    resolved copy is ``model.rankdyna_config``, and ``config`` itself is not changed.
    """
    wrapper, model = model, unwrap_model(model)
    if gated_layers(model):
        raise ValueError("The model already holds RankDyna layers; prepare_model must be called once per model.")
    _refuse_sharded(model)
    config, resolved = resolve_model_kind(config, model, has_calibration=calibration_batches is not None)
    targets = find_target_linears(model, config.target_modules)
    channel_ffns = _channel_ffns(model, targets, config)
    if config.ffn_groups == AUTO:
        # Recorded as what ran, so that the resolved config prepares the same model again.
        resolved["ffn_groups"] = "channels" if channel_ffns else "singular"
        config = dataclasses.replace(config, ffn_groups=resolved["ffn_groups"])
    attention, no_attention_channels = _attention_blocks(model, targets, config)
    if config.attention_groups == AUTO:
        resolved["attention_groups"] = "channels" if attention else "singular"
        config = dataclasses.replace(config, attention_groups=resolved["attention_groups"])
    _log_defaults(model, resolved, config, len(channel_ffns), len(attention), no_attention_channels)
    handled_whole = set(channel_ffns) | {p for producers in channel_ffns.values() for p in producers}
    handled_whole |= {name for block in attention for name in block.names}
    targets = {n: layer for n, layer in targets.items() if n not in handled_whole}
    if config.init == "whitened":
        if calibration_batches is None:
            raise ValueError("RankDynaConfig(init='whitened') needs calibration data: pass calibration_batches "
                             "(a list or dataloader of token-id batches) to prepare_model.")
        batches = first_batches(calibration_batches, None, "RankDynaConfig(init='whitened')")

        def factorize_block(block, names, second_moments):
            cache = {}
            for name in names:
                factorization = whitened_factorization(linear_weight(targets[name]), second_moments[name],
                                                       config.whitening_damping, cache)
                set_submodule(model, name, _svd_linear(targets[name], factorization, config))

        if targets:
            blockwise(model, targets, batches, factorize_block, desc="Factorizing (whitened SVD)",
                      statistic="second_moment")
    else:
        with torch.no_grad():
            for name, linear in tqdm(targets.items(), desc="Factorizing (SVD)", disable=len(targets) < 50):
                set_submodule(model, name, _svd_linear(linear, svd_factorization(linear_weight(linear)), config))
    for name, producers in channel_ffns.items():
        writers = {p: model.get_submodule(p) for p in producers}
        set_submodule(model, name, ChannelGatedLinear.from_linear(model.get_submodule(name), writers))
        for producer_name, producer in writers.items():
            set_submodule(model, producer_name, channel_producer(producer))
    for block in attention:
        make_attention_channels(model, block)
    model.rankdyna_config = config
    _keep_buffers_out_of_ddp(model)
    return wrapper


def _log_defaults(model: nn.Module, resolved: dict, config: RankDynaConfig, channel_ffn_count: int,
                  attention_count: int, no_attention_channels: str) -> None:
    """One INFO line with every 'auto' field prepare_model decided, and why."""
    if not resolved:
        return
    kind = model_kind(model)
    notes = {"ffn_groups": f"{channel_ffn_count} FFNs pruned by intermediate channels" if channel_ffn_count
             else "singular groups in every matrix: channels need importance='fisher' and known FFN roles",
             "attention_groups": f"{attention_count} attentions pruned by per-head q/k and v/o channels"
             if attention_count else f"singular groups: {no_attention_channels}"}
    if "untrained_groups" in resolved and kind == "decoder":
        if resolved["untrained_groups"] == "dropped":
            notes["untrained_groups"] = f"target_budget {config.target_budget} <= 0.5"
        elif config.target_budget > 0.5:
            notes["untrained_groups"] = f"target_budget {config.target_budget} > 0.5"
        else:
            notes["untrained_groups"] = f"factor_budget {config.factor_budget} < target_budget {config.target_budget}"
    later = ("; reallocation_interval is set from the run's length when training starts"
             if config.reallocation_interval == AUTO else "")
    logger.info("RankDyna defaults for %s %s (%s): %s%s (docs/method.md#defaults).", article(kind), kind,
                type(model).__name__, describe(resolved, notes), later)


def _refuse_sharded(model: nn.Module) -> None:
    """Factorizing needs each full weight, and layers swapped in after ``fully_shard`` would not be sharded."""
    from torch.distributed.tensor import DTensor

    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"prepare_model got a model whose parameters are already sharded (DTensor: {sharded[0]!r}, ...), e.g. by "
            "from_pretrained(..., distributed_config=...) or fully_shard. Factorize before sharding: load the model "
            "without distributed_config, call prepare_model, then "
            "rankdyna_trainer.methods.rankdyna.shard_model(model, DistributedConfig(fsdp_size=N)).")


def _attention_blocks(model: nn.Module, targets: dict[str, nn.Module],
                      config: RankDynaConfig) -> tuple[list[AttentionBlock], str]:
    """The attentions pruned by q/k and v/o channels, and why there are none where there are none: every one for
    ``attention_groups='channels'`` (an error where they do not apply), none for ``'singular'``. ``'auto'`` takes
    them where they apply (importance='fisher', a BERT/RoBERTa model, each attention's four layers targeted) and
    falls back to singular groups elsewhere."""
    if config.attention_groups == "singular":
        return [], "attention_groups='singular'"
    if config.attention_groups == AUTO:
        if config.importance != "fisher":
            return [], f"channels need importance='fisher', not {config.importance!r}"
        if not supports_channels(model):
            return [], f"channels need BERT/RoBERTa attention, not {type(model).__name__}"
        try:
            return attention_channel_blocks(model, targets), ""
        except ValueError as error:  # target_modules takes some of an attention's layers, or none
            return [], f"channels do not apply: {error}"
    return attention_channel_blocks(model, targets), ""


def _channel_ffns(model: nn.Module, targets: dict[str, nn.Module], config: RankDynaConfig) -> dict[str, list[str]]:
    """``ffn_groups='channels'`` (or ``'auto'`` resolved to it): each targeted FFN output layer -> the layers writing
    its channels. ``'auto'`` falls back to singular groups when no FFN output layer is targeted."""
    if config.resolved_ffn_groups(model) != "channels":
        return {}
    ffns = {out: producers for out, producers in ffn_channel_layers(model, config.ffn_roles(model)).items()
            if out in targets}
    if not ffns and config.ffn_groups == "auto":
        return {}
    if not ffns:
        raise ValueError(f"ffn_groups='channels' found no targeted FFN output layer (target_modules="
                         f"{config.target_modules!r}); FFN output layers of this model: "
                         f"{list(ffn_channel_layers(model, config.ffn_roles(model)))[:4]}.")
    return ffns


def initial_rank(config: RankDynaConfig, out_features: int, in_features: int) -> int:
    """Groups a matrix keeps at factorization time: all ``min(m, n)``, or ``init_rank``."""
    rank = min(out_features, in_features)
    return rank if config.init_rank is None else min(rank, config.init_rank)


def trainable_rank(config: RankDynaConfig, out_features: int, in_features: int) -> int:
    """Leading groups whose factors train: those ``factor_budget`` of the dense weights pays for (all when None)."""
    rank = initial_rank(config, out_features, in_features)
    if config.factor_budget is None:
        return rank
    paid = int(config.factor_budget * out_features * in_features) // (out_features + in_features)
    return min(rank, max(1, paid))


def _svd_linear(linear: nn.Module, factorization: Factorization, config: RankDynaConfig) -> SVDLinear:
    """The top groups of ``factorization`` as an SVDLinear with unit-norm rows of ``V``.

    A whitened ``V`` has rows of very different norms; scaling each to unit norm (the norm moves into ``s``)
    gives its entries the scale of an orthonormal SVD factor, so the optimizer treats both inits alike. The
    product ``U diag(s) V`` is unchanged.
    """
    m, n = linear_shape(linear)
    trainable = trainable_rank(config, m, n)
    rank = trainable if config.untrained_groups == "dropped" else initial_rank(config, m, n)
    norms = factorization.right.norm(dim=1).clamp_min(torch.finfo(factorization.right.dtype).tiny)
    s = factorization.s * norms
    scale = factor_step_scale(s, m, n, config.factor_scaling)[:rank]
    U, s, V = factorization.left[:, :rank], s[:rank], factorization.right[:rank] / norms[:rank, None]
    weight = linear_weight(linear)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    layer = SVDLinear(U.to(weight).contiguous(), s.to(weight), V.to(weight).contiguous(), bias, scale,
                      element_statistics=config.importance == "sensitivity",
                      trainable_rank=trainable)
    layer.exports_as_conv1d = is_conv1d(linear)
    return layer


def _keep_buffers_out_of_ddp(model: nn.Module) -> None:
    """Tell DistributedDataParallel not to broadcast RankDyna's buffers from process 0 before forwards.

    The callback keeps them identical on every process itself (averaged gate gradients, broadcast masks).
    DDP's broadcast would send the importance statistics (twice the size of the factors) every optimizer
    step for nothing, and when it runs between the micro-batches of an accumulated step (accelerate's
    ``sync_each_batch``) it would replace the local partial ``gate_grad`` with process 0's, biasing the
    averaged gate gradient towards process 0.
    """
    names = [f"{layer_name}.{buffer_name}" for layer_name, layer in gated_layers(model).items()
             for buffer_name, _ in layer.named_buffers(recurse=False)]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    # DDP reads this attribute when it wraps the model (the documented DistributedDataParallel
    # ._set_params_and_buffers_to_ignore_for_model workaround, which also marks the tensors).
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored + names)


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, SVDLinear)}


def gated_layers(model: nn.Module) -> dict[str, SVDLinear | ChannelGroups]:
    """Every layer whose groups the allocation keeps or masks: factorized matrices, channel-gated FFNs and
    (attention_groups='channels') the attentions' q/k and v/o channel layers."""
    return {name: m for name, m in unwrap_model(model).named_modules()
            if isinstance(m, (SVDLinear, ChannelGroups))}


def dense_params(layers: list[SVDLinear | ChannelGatedLinear]) -> int:
    """Dense weights the layers stand for (a channel-gated FFN: all its layers' weights)."""
    return sum(l.full_cost for l in layers)


def layer_ranks(layers: list[SVDLinear]) -> list[int]:
    """Kept groups per layer (one host sync for all layers)."""
    return torch.stack([l.gate.sum() for l in layers]).long().tolist() if layers else []


def kept_params(layers: list[SVDLinear | ChannelGatedLinear]) -> int:
    """Parameters the targeted matrices will take once exported (one host sync for all layers)."""
    return sum(min(r * l.group_cost, l.full_cost) for r, l in zip(layer_ranks(layers), layers))


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Kept groups per gated layer (for a channel-gated FFN: its kept channels)."""
    layers = gated_layers(model)
    return dict(zip(layers, layer_ranks(list(layers.values()))))


def pruned_away(ranks: dict[str, int]) -> tuple[list[str], list[str]]:
    """Matrices at rank 0, and blocks (parent modules, e.g. ``layer.1.attention.self``) whose every targeted matrix
    is at rank 0."""
    zero = [name for name, rank in ranks.items() if rank == 0]
    by_parent: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        by_parent.setdefault(name.rpartition(".")[0], []).append(rank)
    blocks = [parent for parent, block_ranks in by_parent.items() if parent and not any(block_ranks)]
    return zero, blocks


@torch.no_grad()
def export_model(model: nn.Module) -> dict[str, dict]:
    """Replace every SVDLinear (in place) by its kept groups as ``Linear(n, r) -> Linear(r, m)``, or by a dense
    ``Linear`` (``Conv1D`` where the model had one) where that is no larger, every channel-gated FFN by its kept
    channels (smaller dense layers) and every channel-gated attention by its kept q/k and v/o dims (query, key and
    value ``ScatteredLinear``, output ``GatheredLinear``). Returns the module layout, which is
    also recorded on ``model.config`` so that ``model.save_pretrained`` writes a model ``from_pretrained`` reloads.
    ``model`` may be wrapped by ``torch.compile``: names are those of the model inside."""
    from ...export import describe_module, factorized_or_dense
    from ...quantizer import record_compression

    model = unwrap_model(model)
    modules = {}
    for name, layer in svd_layers(model).items():
        keep = layer.gate.bool()
        s = layer.s[keep]
        # Split each singular value evenly between the two factors so neither carries all the scale.
        root = s.abs().sqrt()
        left = layer.left()[:, keep] * (root * s.sign())
        right = root[:, None] * layer.right()[keep]
        bias = layer.bias.detach() if layer.bias is not None else None
        exported = factorized_or_dense(left.detach(), right.detach(), bias, conv1d=layer.exports_as_conv1d)
        set_submodule(model, name, exported)
        modules[name] = describe_module(exported)
    exported = {}
    for name, layer in gated_layers(model).items():  # the channel layers left: FFNs, attentions
        exported.update(layer.exported(model, name))
    for name, module in exported.items():
        set_submodule(model, name, module)
        modules[name] = describe_module(module)
    config = getattr(model, "rankdyna_config", None)
    record_compression(model, modules, "rankdyna", config.to_dict() if config is not None else None)
    if config is not None:
        del model.rankdyna_config
    return modules
