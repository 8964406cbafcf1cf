"""Tensor-parallel targets: transformers' `tp_plan="auto"` under `torchrun`, the speculative loop unchanged.

Every rank runs the same loop in lockstep. The sharded target's forward is the collective one (its all-reduces leave
the same logits on every rank); a replicated draft computes the same thing everywhere; the loop's random numbers come
from one stream that rank 0 hands to all ranks before the first step. Then every decision of the loop (tree shape,
accepted path, finished rows) is made on equal tensors, so the ranks stay in step without talking. If they do not
(a draft that differs between ranks, a nondeterministic kernel), a rank would call a collective with other shapes than
its peers and hang: `LockstepBackend` compares a fingerprint of every target call's inputs across ranks first, and
raises `RanksDivergedError` on every rank instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class RanksDivergedError(RuntimeError):
    """Ranks of a tensor-parallel run disagreed on what the loop computes (they would otherwise hang)."""


@dataclass(frozen=True)
class TensorParallel:
    mesh: object  # torch.distributed.DeviceMesh of the sharded weights
    group: object  # its process group
    rank: int  # this process's rank in the group
    world_size: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def first_global_rank(self) -> int:
        return dist.get_global_rank(self.group, 0)


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def tensor_parallel(model) -> TensorParallel | None:
    """The tensor-parallel layout of a model loaded with a TP plan (its weights are DTensors), or None."""
    if model is None or not dist.is_available() or not dist.is_initialized():
        return None
    dtensor = _dtensor_type()
    for parameter in model.parameters():
        if isinstance(parameter, dtensor):
            mesh = parameter.device_mesh
            group = mesh.get_group()
            return TensorParallel(mesh, group, dist.get_rank(group), dist.get_world_size(group))
    return None


def _uncovered_layers(model) -> list[int]:
    """Decoder layers none of whose weights the TP plan sharded."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        return []
    dtensor = _dtensor_type()
    return [index for index, layer in enumerate(layers)
            if not any(isinstance(parameter, dtensor) for parameter in layer.parameters())]


def check_sharded_pair(target, draft) -> TensorParallel | None:
    """The target's TP layout after checking what lockstep needs of the pair; None for an unsharded target."""
    target_layout, draft_layout = tensor_parallel(target), tensor_parallel(draft)
    if draft_layout is not None and target_layout is None:
        raise ValueError(
            "the draft model is tensor-parallel (loaded with a tp_plan) but the target is not: load the draft without "
            "tp_plan (a small draft is replicated on every rank), or shard the target the same way"
        )
    if target_layout is None:
        return None
    if draft_layout is not None and draft_layout.mesh != target_layout.mesh:
        raise ValueError(
            "the draft model is sharded over another device mesh than the target: load the draft without tp_plan "
            "(replicated on every rank) or with the target's mesh (from_pretrained(..., tp_plan='auto', "
            "device_mesh=target.device_mesh))"
        )
    for role, model in (("target", target), ("draft", draft if draft_layout is not None else None)):
        uncovered = _uncovered_layers(model) if model is not None else []
        if uncovered:
            raise ValueError(
                f"the {role} model is tensor-parallel, but its TP plan shards none of the weights of decoder layers "
                f"{uncovered}: those layers would run replicated and the loop cannot tell whether their outputs agree; "
                "load it with tp_plan='auto' (the model's own plan) or a plan with an entry for every layer, e.g. "
                "'layers.*.self_attn.q_proj': 'colwise'"
            )
    return target_layout


def share_random_state(layout: TensorParallel, device: torch.device) -> None:
    """Give every rank rank 0's random stream (the CPU generator and, on CUDA, the device's): from here on the ranks
    draw the same numbers, and rank 0's run is the one an unsharded run with its seed would make."""
    states = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]
    dist.broadcast_object_list(states, src=layout.first_global_rank, group=layout.group)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A fixed-size int64 summary of `tensors` (shapes and position-weighted sums): equal on every rank when the
    tensors are, different with near certainty when they are not."""
    parts = []
    for tensor in tensors:
        flat = tensor.detach().flatten()
        values = flat.long() if not flat.is_floating_point() else flat.double().mul(2**20).round().long()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.long)
        parts.append(torch.stack([
            torch.tensor(flat.numel(), device=flat.device),
            torch.tensor(tensor.shape[0] if tensor.dim() else 1, device=flat.device),
            (values * weights).sum(),
        ]))
    return torch.cat(parts)


class LockstepCheck:
    """Compares fingerprints across the ranks of `layout` (one all-gather and one host read per check)."""

    def __init__(self, layout: TensorParallel, device: torch.device):
        self.layout = layout
        self.device = device
        self.calls = 0

    def __call__(self, what: str, tensors: list[torch.Tensor]) -> None:
        self.calls += 1
        # the call number and the check's kind are part of the fingerprint: a rank one step ahead mismatches too
        kind = sum(map(ord, what))
        local = torch.cat([torch.tensor([self.calls, kind], device=self.device), fingerprint(tensors).to(self.device)])
        gathered = [torch.empty_like(local) for _ in range(self.layout.world_size)]
        dist.all_gather(gathered, local, group=self.layout.group)
        table = torch.stack(gathered)
        if bool((table != table[0]).any()):
            differing = [rank for rank in range(self.layout.world_size) if not torch.equal(table[rank], table[0])]
            raise RanksDivergedError(
                f"tensor-parallel ranks {differing} disagree with rank 0 on {what} (check {self.calls}): the loop must "
                "compute the same thing on every rank. Load the same draft on every rank (replicated, or sharded with "
                "the target's plan), keep deterministic kernels, and do not seed ranks differently after generate() "
                "has started"
            )


class LockstepBackend:
    """A backend of a sharded model whose every call is first checked to have the same inputs on every rank."""

    def __init__(self, backend, check: LockstepCheck, role: str):
        self._backend = backend
        self._check = check
        self._role = role

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def prefill(self, input_ids, position_ids, attention_mask, key_positions, features=None, return_features=False):
        self._check(f"the {self._role}'s prefill inputs", [input_ids, position_ids, attention_mask])
        return self._backend.prefill(input_ids, position_ids, attention_mask, key_positions, features=features,
                                     return_features=return_features)

    def forward(self, input_ids, position_ids, attention_mask, key_positions, features=None, return_features=False):
        self._check(f"the {self._role}'s step inputs", [input_ids, position_ids, attention_mask])
        return self._backend.forward(input_ids, position_ids, attention_mask, key_positions, features=features,
                                     return_features=return_features)
