"""RankDyna under FSDP2: factorize, then shard; importance statistics on shards; gather the full model to export.

The order matters. ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`` applies
``fully_shard`` right after the model is built and *before* its weights are loaded (``modeling_utils``:
``maybe_distribute_model`` runs before the state dict is read; each rank then reads only its shard), so no
process ever holds a full weight that :func:`prepare_model` could factorize, and modules swapped in after
``fully_shard`` are not managed by FSDP. So: load unsharded, :func:`prepare_model`, then :func:`shard_model`
(transformers' own FSDP2 plan, so the Trainer treats the model exactly as one sharded at load time).

Under FSDP2 the parameters (``U``, ``s``, ``V``, a gated FFN's weights) and their gradients are ``DTensor`` s
sharded on dim 0; buffers are not sharded. The gates and the gate-based statistics (``fisher``, the gate part of
``sensitivity``) are small and stay replicated; the element-wise ``sensitivity`` statistics of ``U`` and ``V``
are as large as the factors, so :func:`shard_statistics_like_parameters` shards them like their parameter.

Tied input/output embeddings are sharded the way ``from_pretrained`` shards them: untied while ``fully_shard``
runs (it builds the model under ``no_tie_weights``), one FSDP rule for the pair (transformers'
``_resolve_tied_embed_lm_head_plan``), tied again afterwards (``tie_weights``).

A sharded model's ``load_state_dict`` also takes a full (plain-tensor) state dict, each rank keeping its own chunk
(:func:`_full_tensors_into_shards`): that is how ``Trainer.train(resume_from_checkpoint=...)`` reloads the
``model.safetensors`` it wrote.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from .dtensors import is_dtensor, local
from .model import gated_layers, svd_layers

ELEMENT_STATISTICS = ("sensitivity_U", "uncertainty_U", "sensitivity_V", "uncertainty_V")


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``, tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


def shard_model(model: nn.Module, distributed_config) -> nn.Module:
    """FSDP2-shard a model that went through :func:`prepare_model`, as ``from_pretrained(distributed_config=...)``
    would have (same mesh, same ``fsdp_plan``); the Trainer then treats it as a model sharded at load time.

    Run under ``torchrun``; every process must pass the same prepared model. Only data-parallel sharding
    (``fsdp_size``) is supported: tensor, pipeline and expert parallelism and HSDP replicas are refused.
    Process 0's factors are broadcast first, so every shard comes from one factorization even if the SVD
    differs between hosts. Returns ``model`` (sharded in place).
    """
    from transformers.distributed import DistributedConfig

    if isinstance(distributed_config, dict):
        distributed_config = DistributedConfig.from_dict(distributed_config)
    if not gated_layers(model):
        raise ValueError("shard_model expects a model passed through prepare_model (it holds no RankDyna layer): "
                         "call prepare_model(model, config) first, then shard_model.")
    if is_sharded(model):
        raise ValueError("shard_model got a model that is already sharded (its parameters are DTensors).")
    unsupported = {name: getattr(distributed_config, name) for name in ("tp_size", "pp_size", "ep_size",
                                                                        "dp_replicate_size")
                   if (getattr(distributed_config, name, 1) or 1) > 1}
    if unsupported:
        raise ValueError(f"RankDyna's sharded path is FSDP2 data parallelism only (DistributedConfig(fsdp_size=N)); "
                         f"got {unsupported}, which was never run with RankDyna layers.")
    tied = _has_tied_embeddings(model)
    distributed_config, _, mesh_manager = type(model).prepare_distribute_model(distributed_config)
    if mesh_manager is None:  # fsdp_size 1: nothing to shard
        return model
    _broadcast_state_from_rank0(model)
    frozen_factors_as_parameters(model)
    if tied:
        _untie_embeddings(model)
    model = type(model).maybe_distribute_model(model, distributed_config, mesh_manager)
    if tied:
        model.tie_weights(recompute_mapping=False)
    shard_statistics_like_parameters(model)
    model.register_load_state_dict_pre_hook(_full_tensors_into_shards)
    return model


@torch.no_grad()
def _broadcast_state_from_rank0(model: nn.Module) -> None:
    # Once, before sharding: fully_shard keeps each rank's own chunk of its own full tensor, so the chunks must
    # come from the same tensors. One flat broadcast per dtype.
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel()]
    for dtype in sorted({t.dtype for t in tensors}, key=str):  # same order on every process
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(group, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in group]), group)])


def _embeddings_and_head(model: nn.Module):
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    return (get_in() if get_in else None), (get_out() if get_out else None)


def _has_tied_embeddings(model: nn.Module) -> bool:
    """Whether the output layer shares the input embeddings' weight (refused, before any collective, when
    transformers does not list the tie: it could not be restored after sharding)."""
    embeddings, head = _embeddings_and_head(model)
    if embeddings is None or head is None or head.weight is not embeddings.weight:
        return False
    if not getattr(model, "all_tied_weights_keys", None):
        raise ValueError(f"{type(model).__name__} shares its output layer's weight with its input embeddings, but "
                         "transformers lists no tied weights for it (all_tied_weights_keys is empty), so the tie "
                         "could not be restored after sharding. Untie the model (model.config.tie_word_embeddings = "
                         "False and a separate output weight) before shard_model.")
    return True


def _untie_embeddings(model: nn.Module) -> None:
    """Give a tied output layer its own parameter (a copy of the embedding) while ``fully_shard`` runs.

    ``fully_shard`` on a tied model puts the one weight into two FSDP groups, and FSDP2 refuses that at the first
    forward ("shared with a parameter already managed by another FSDP group"). ``from_pretrained`` never meets this:
    it builds the model untied (``no_tie_weights``), shards it with a plan that gives the pair one rule
    (``_resolve_tied_embed_lm_head_plan``), loads, then ties. :func:`shard_model` does the same (``tie_weights`` after
    ``fully_shard``), so the output layer uses the sharded embedding again, and its gradient adds to the
    embedding's, as in one process."""
    embeddings, head = _embeddings_and_head(model)
    head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=embeddings.weight.requires_grad)


def _full_tensors_into_shards(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of a sharded model: each plain tensor of ``state_dict`` whose target is a DTensor
    becomes a DTensor placed like the target, from this rank's chunk (every rank holds the full tensor: it read the
    same file). Without it, ``load_state_dict`` fails with "aten.copy_.default got mixed torch.Tensor and DTensor",
    which is where ``Trainer._load_from_checkpoint`` stops when it resumes a model sharded at load time.
    Shapes are left to ``load_state_dict``'s own check."""
    owner = prefix[:-1] if prefix else ""
    targets = list(module.named_parameters(prefix=owner, remove_duplicate=False)) + list(
        module.named_buffers(prefix=owner, remove_duplicate=False))
    for name, target in targets:
        incoming = state_dict.get(name)
        if (is_dtensor(target) and isinstance(incoming, torch.Tensor) and not is_dtensor(incoming)
                and incoming.shape == target.shape):
            state_dict[name] = _shard_like(incoming.to(local(target).device), target)


def frozen_factors_as_parameters(model: nn.Module) -> None:
    """Turn each SVDLinear's frozen factors (``U_frozen``, ``V_frozen``: the groups beyond ``factor_budget``) from
    buffers into parameters that do not train, so FSDP2 shards them (and gathers them for the forward) instead of
    keeping a full copy on every rank: with the default ``factor_budget=1.0`` they are about half of a square
    matrix's factors. Same names, so the state dict and the saved files do not change."""
    for layer in svd_layers(model).values():
        for name in ("U_frozen", "V_frozen"):
            if name in layer._buffers:
                layer.register_parameter(name, nn.Parameter(layer._buffers.pop(name), requires_grad=False))


def shard_statistics_like_parameters(model: nn.Module) -> None:
    """Make each SVDLinear's element-wise statistics (``sensitivity_U`` ...) DTensors placed like ``U``/``V``, so each
    rank keeps (and updates) only the entries of its own shard. No-op for unsharded layers; idempotent."""
    for layer in svd_layers(model).values():
        for name in ELEMENT_STATISTICS:
            buffer, param = layer._buffers.get(name), getattr(layer, name[-1])
            if buffer is None or is_dtensor(buffer) or not is_dtensor(param):
                continue
            layer._buffers[name] = _shard_like(buffer, param)


def _shard_like(tensor: torch.Tensor, param) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    # src_data_rank=None: each rank cuts its own chunk (the values are identical everywhere); the clone frees
    # the full-size storage the chunk would otherwise keep alive.
    sharded = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)
    part = sharded.to_local().clone()
    if part.shape != param.to_local().shape:
        raise RuntimeError(f"Statistic shard {tuple(part.shape)} does not match its parameter's shard "
                           f"{tuple(param.to_local().shape)} (placements {param.placements}).")
    return DTensor.from_local(part, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


# -- gathering a sharded model on process 0 ---------------------------------------------------------------------------
def gather_unsharded_model(model: nn.Module) -> nn.Module | None:
    """An unsharded CPU copy of a sharded prepared model, on process 0 (``None`` on the others; every process
    must call this, it gathers). The copy holds the same RankDyna layers with full tensors and no FSDP hooks,
    ready for :func:`export_model` and ``save_pretrained``::

        full = gather_unsharded_model(trainer.model)
        if full is not None:
            export_model(full)
            full.save_pretrained(out)
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    copy_ = _meta_clone(model)
    copy_.load_state_dict(state, strict=False, assign=True)
    # Buffers outside the state dict (non-persistent: rotary frequencies, gate_grad) are replicated, plain tensors.
    live_buffers = dict(model.named_buffers())
    for name, buffer in copy_.named_buffers():
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            source = live_buffers[name]
            copy_.get_submodule(owner)._buffers[attr] = (source.full_tensor() if is_dtensor(source) else source
                                                         ).detach().to("cpu").clone()
    if hasattr(copy_, "tie_weights"):  # before the check: a tied output weight is not in the state dict
        copy_.tie_weights()
    left_on_meta = [n for n, t in list(copy_.named_parameters()) + list(copy_.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"gather_unsharded_model could not fill {left_on_meta[:5]} from the full state dict.")
    return copy_


def _meta_clone(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A copy of ``module``'s tree with every parameter and buffer replaced by an empty meta tensor of its *global*
    shape, FSDP's class swap undone and its hooks dropped (the copy must run without collectives)."""
    from torch.distributed.fsdp import FSDPModule

    memo = {} if memo is None else memo
    if id(module) in memo:  # a module reachable twice (shared submodule) stays shared
        return memo[id(module)]
    cls = type(module)
    if isinstance(module, FSDPModule):  # fully_shard swapped the class to FSDP<cls>(FSDPModule, cls)
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    clone = object.__new__(cls)  # not copy.copy: FSDPModule.__new__ would call __init__
    clone.__dict__.update(module.__dict__)
    memo[id(module)] = clone
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                  "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                  "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        if hooks in module.__dict__:
            kept = OrderedDict((k, h) for k, h in module.__dict__[hooks].items() if not _is_fsdp_hook(h))
            clone.__dict__[hooks] = kept if isinstance(module.__dict__[hooks], OrderedDict) else dict(kept)
    clone._parameters = {name: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                                   requires_grad=p.requires_grad)
                         for name, p in module._parameters.items()}
    clone._buffers = {name: None if b is None else torch.empty(b.shape, dtype=b.dtype, device="meta")
                      for name, b in module._buffers.items()}
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    clone._modules = {name: None if m is None else _meta_clone(m, memo) for name, m in module._modules.items()}
    for attr in ("_is_distributed_loading_by_transformers", "_device_mesh", "_mesh_manager", "_is_fsdp_managed_module"):
        if attr in module.__dict__:
            clone.__dict__.pop(attr)
    for attr in ("_composable_api_registry", "__composable_api_state_key", "_fsdp_state"):
        clone.__dict__.pop(attr, None)
    if hasattr(module, "config") and "config" in module.__dict__:
        clone.config = copy.deepcopy(module.config)
        if getattr(clone.config, "distributed_config", None) is not None:
            clone.config.distributed_config = None
    return clone


def _is_fsdp_hook(hook) -> bool:
    """A hook that fully_shard registered (a bound method of its state, or a wrapper function defined in
    torch.distributed), or :func:`shard_model`'s own (it holds a reference to the sharded model); any other hook
    (transformers' own) is kept."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    if getattr(hook, "__wrapped__", hook) is _full_tensors_into_shards:
        return True
    owner = getattr(hook, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(hook, "__module__", "") or ""
    return module.startswith("torch.distributed")
