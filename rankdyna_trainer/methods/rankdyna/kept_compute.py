"""Training compute that follows the allocation: a layer multiplies only the groups its gate keeps.

Masking alone leaves every masked singular group and FFN channel in the products (multiplied by zero), so a run
costs a dense-sized step until export. :class:`KeptCompute` gives each gated layer the index tensors of its kept
groups (and each producer those of its reader's kept channels); the layers then gather the kept columns of ``U``,
rows of ``V`` and FFN channels and multiply only those. Attention channels (``attention_groups='channels'``) do the
same in their projections: query, key and value compute their kept rows only and scatter them into the full
``heads x head_dim`` width the attention code needs, and ``attention.output.dense`` reads only the kept columns.
Parameters keep their shapes (optimizer state, DDP buckets and FSDP shards are untouched): a masked group's factors
get a zero gradient, as they did under the 0 gate.

Only the gate gradients of masked groups are lost on a kept-only step, and they are what lets a masked group come
back. So on *scoring* steps (``RankDynaConfig.masked_group_scoring``) the layers run every group again.

Gathering has a cost of its own (copies of the kept weights, their gradients copied back, scattered attention
outputs), so a layer that keeps most of its groups stays on the plain path: the same model, cheaper there.
"""

from __future__ import annotations

import torch
from torch import nn

from ...host_memory import FreedHeapTrim
from .layer import ChannelGroups, SVDLinear

# A layer keeping more than this fraction of its groups runs the plain (gated, all-groups) path. One MiniLM training
# step with every gated layer at the same kept fraction costs 1.07 / 1.02 / 0.94 / 0.86 of dense at 0.95 / 0.9 / 0.8 /
# 0.7 kept on the kept path, against 1.00 on the plain path (`scripts/bench_step_profile.py --kept 1,1 1,0.95 1,0.9
# 1,0.8 1,0.7 --steps 10`, 2-core CPU, before this threshold existed; docs/cost.md): break-even near 0.88.
KEPT_PATH_MAX_FRACTION = 0.85


class KeptCompute:
    """The kept-group indices of a model's gated layers, recomputed after each change of the gates.

    ``refresh()`` costs two host synchronisations for all layers together, and runs only when the allocation
    changes; switching between the kept-only and the all-groups path (``use_kept``) is host-side only.
    """

    def __init__(self, model: nn.Module, layers: list[SVDLinear | ChannelGroups],
                 max_kept_fraction: float = KEPT_PATH_MAX_FRACTION):
        self.layers = layers
        self.max_kept_fraction = max_kept_fraction  # above it (or keeping every group) a layer runs the plain path
        # A channel layer without a kept-groups path (computes_kept False) would run gated on every step.
        self.computes_kept = [getattr(l, "computes_kept", True) for l in layers]
        self.producers = [[model.get_submodule(p) for p in l.producers]
                          if isinstance(l, ChannelGroups) and computes else []
                          for l, computes in zip(layers, self.computes_kept)]
        self._indices: list | None = None
        self._kept_only = False
        self.trim_heap = FreedHeapTrim()

    def _gate_parts(self) -> list[torch.Tensor]:
        # An SVDLinear's gate splits into its trainable and its frozen groups (separate factor tensors).
        parts = []
        for layer in self.layers:
            if isinstance(layer, SVDLinear):
                parts += list(layer.gate.split([layer.trainable_rank, layer.max_rank - layer.trainable_rank]))
            else:
                parts.append(layer.gate)
        return parts

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute every layer's kept indices from its gate (call after the gates change)."""
        parts = self._gate_parts()
        sizes = torch.tensor([0] + [p.numel() for p in parts], device=parts[0].device).cumsum(0)
        positions = torch.cat(parts).nonzero().flatten()  # host sync 1
        bounds = torch.searchsorted(positions, sizes).tolist()  # host sync 2
        kept = [positions[bounds[i]:bounds[i + 1]] - sizes[i] for i in range(len(parts))]
        self._indices, i = [], 0
        for layer, computes in zip(self.layers, self.computes_kept):
            width = 2 if isinstance(layer, SVDLinear) else 1
            index = (kept[i], kept[i + 1]) if width == 2 else kept[i]
            count, total = sum(k.numel() for k in kept[i:i + width]), sum(p.numel() for p in parts[i:i + width])
            gathers = computes and count < total and count <= self.max_kept_fraction * total
            self._indices.append(index if gathers else None)
            layer.all_groups_kept = count == total  # its gate multiplies by ones only (layer.gate_for_forward)
            i += width
        self.use_kept(self._kept_only)
        if parts[0].device.type == "cpu":
            self.trim_heap()  # the previous allocations' gathered shapes, once they add up (host_memory explains)

    def use_kept(self, kept_only: bool) -> None:
        """Kept groups only (``True``) or every group, gated (``False``, needed for masked groups' scores)."""
        self._kept_only = kept_only
        if kept_only and self._indices is None:
            self.refresh()
            return
        for layer, producers, index in zip(self.layers, self.producers, self._indices or [None] * len(self.layers)):
            layer.kept_index = index if kept_only else None
            for producer in producers:
                producer.kept_index = layer.kept_index

    def clear(self) -> None:
        """Back to every layer's plain, all-groups forward (training is over, or the gates may change elsewhere)."""
        self.use_kept(False)
        self._indices = None
        for layer in self.layers:
            layer.all_groups_kept = False  # not known once the gates are no longer refreshed here
