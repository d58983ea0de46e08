"""DTensor helpers for FSDP2 shards (no other import from the package, so the score code can use them)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: in-place ops on it update the DTensor), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_row_indices(param) -> torch.Tensor:
    """Global indices along dim 0 of the rows this rank holds of a Shard(0) DTensor (all rows if not sharded)."""
    if not is_dtensor(param):
        return torch.arange(param.shape[0], device=param.device)
    from torch.distributed.tensor import distribute_tensor

    rows = torch.arange(param.shape[0], device=local(param).device)
    return distribute_tensor(rows, param.device_mesh, param.placements, src_data_rank=None).to_local()


def mesh_group(tensors) -> dist.ProcessGroup | None:
    """The process group that the first DTensor among ``tensors`` is sharded over (None when none is)."""
    for t in tensors:
        if is_dtensor(t):
            return t.device_mesh.get_group()
    return None
