"""HF tensors ⇄ a sharded Megatron model, through the mapping table.

``load_hf_weights`` fills each rank's parameter shards from an HF checkpoint (each rank reads only the tensors
its shards need); ``hf_sharded_state_dict`` builds instead the sharded state dict a converter saves, with no
model storage at all, and ``load_checkpoint_in_place`` reads a Megatron checkpoint into an uninitialised model.
``export_hf_weights`` is the reverse, used by the HF exporter and by the weight sync to the rollout engine: a
collective over all ranks that yields full HF-named tensors on global rank 0, gathering TP (or expert-TP) shards
inside the owning pipeline stage and sending the result to rank 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_sapo.convert.hf_io import HFCheckpointReader
from megatron_sapo.convert.mapping import (
    WEIGHT_RULES,
    WeightRule,
    hf_names,
    hf_shapes,
    iter_hf_params,
    match_megatron_name,
    merge_hf,
    shard,
    split_megatron,
    unshard,
)
from megatron_sapo.models.arch import ModelArch

ParamKey = tuple[int, int | None, int | None]  # (rule index, global layer, global expert)


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


@dataclass
class LocalWeight:
    key: ParamKey
    rule: WeightRule
    param: torch.nn.Parameter
    tp_rank: int
    tp_size: int
    tp_group: object


def local_weights(chunks: list[torch.nn.Module], arch: ModelArch) -> list[LocalWeight]:
    """This rank's parameters, each tied to its mapping rule and its global layer/expert numbers."""
    from megatron.core import parallel_state as ps

    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    num_local_experts = arch.num_experts // ep_size
    weights = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        global_layer = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
        for name, param in model.named_parameters():
            matched = match_megatron_name(name, arch)
            if matched is None:
                raise RuntimeError(f"no weight-mapping rule for Megatron parameter {name}")
            layer = global_layer[matched.layer] if matched.layer is not None else None
            expert = ep_rank * num_local_experts + matched.expert if matched.expert is not None else None
            if matched.rule.is_expert:
                tp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
                group = ps.get_expert_tensor_parallel_group()
            else:
                tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
                group = ps.get_tensor_model_parallel_group()
            key = (WEIGHT_RULES.index(matched.rule), layer, expert)
            weights.append(LocalWeight(key, matched.rule, param, tp[0], tp[1], group))
    return weights


def _hf_parts(weights: list[LocalWeight], reader: HFCheckpointReader, progress: bool):
    """Yield (weight, the HF tensors it is made of) in order, reading only the HF tensors this rank's shards need."""
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    for weight in tqdm(weights, desc="tensors converted", unit="tensor", disable=not show):
        _, layer, expert = weight.key
        yield weight, [reader.get(name) for name in hf_names(weight.rule, layer, expert)]


def _local_shard(weight: LocalWeight, parts: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """This rank's shard of ``weight`` from its HF tensors."""
    local = shard(weight.rule, merge_hf(weight.rule, parts, arch), weight.tp_rank, weight.tp_size)
    if local.shape != weight.param.shape:
        _, layer, expert = weight.key
        raise RuntimeError(f"{hf_names(weight.rule, layer, expert)} → shard {list(local.shape)} "
                           f"does not fit parameter {list(weight.param.shape)}")  # fmt: skip
    return local


@torch.no_grad()
def load_hf_weights(
    chunks: list[torch.nn.Module], reader: HFCheckpointReader, arch: ModelArch, progress: bool = True
) -> None:
    """Copy an HF checkpoint into this rank's shards. The reader must have been validated against ``arch``."""
    for weight, parts in _hf_parts(local_weights(chunks, arch), reader, progress):
        weight.param.copy_(_local_shard(weight, parts, arch))


@torch.no_grad()
def hf_sharded_state_dict(
    chunks: list[torch.nn.Module], reader: HFCheckpointReader, arch: ModelArch, progress: bool = True
) -> dict:
    """This rank's Megatron sharded state dict (``{"model": ...}``) with its tensors read from an HF checkpoint,
    for a model built without storage (``torch.device("meta")``): conversion never fills a model.

    The model's own ``sharded_state_dict`` decides the checkpoint keys and how each parameter is cut (its factories,
    such as the SwiGLU fc1 split, applied here); each of its tensors is a parameter or a view of one, and is re-made
    from the HF values with the same geometry. Every tensor owns exactly its storage: megatron's writer clones
    tensors that are views of a larger storage, all before writing, which would hold the shard twice.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    if len(chunks) != 1:
        raise NotImplementedError("conversion builds one model chunk per rank (no virtual pipeline stages)")
    sharded = {"model": chunks[0].sharded_state_dict()}
    apply_factories(sharded)
    of_param: dict[int, list] = {}
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            base = value.data if value.data._base is None else value.data._base
            of_param.setdefault(id(base), []).append(value)
    for weight, parts in _hf_parts(local_weights(chunks, arch), reader, progress):
        # Without TP a copy, vocab (rows, then padding) or SwiGLU-fc1 parameter is its HF tensors stacked by rows,
        # and megatron cuts fc1 into exactly [gate; up]: a view that is one whole HF tensor is that tensor, as read
        # (mapped from the file), with no merge and no copy. A vocabulary that needs no padding is one such view.
        stacked = weight.tp_size == 1 and weight.rule.kind in ("copy", "vocab", "gate_up")
        starts = list(itertools.accumulate((part.numel() for part in parts), initial=0))
        local = None
        for value in of_param.pop(id(weight.param)):
            view, offset = value.data, value.data.storage_offset() - weight.param.storage_offset()
            whole = [part for part, start in zip(parts, starts) if (start, part.shape) == (offset, view.shape)]
            if stacked and view.is_contiguous() and whole:
                value.data = _owning(whole[0], value.dtype)
                continue
            if local is None:
                local = _local_shard(weight, parts, arch).contiguous()  # the parameter's layout: strides carry over
            value.data = _owning(local.as_strided(view.size(), view.stride(), local.storage_offset() + offset),
                                 value.dtype)  # fmt: skip
    if of_param:
        leftover = next(iter(of_param.values()))[0].key
        raise RuntimeError(f"checkpoint tensor {leftover} is not a view of any mapped parameter")
    return sharded


def _owning(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, owning exactly its storage. A tensor that already does is kept: an HF tensor that
    is a whole parameter goes to the writer as it was read, without a copy."""
    owns = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if tensor.dtype == dtype and tensor.is_contiguous() and owns:
        return tensor
    return tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def load_checkpoint_in_place(chunks: list[torch.nn.Module], ckpt_dir: str, *, field: str = "checkpoint") -> None:
    """Collective: read a Megatron checkpoint straight into the parameters of a model built without
    initialisation: the factories (the SwiGLU fc1 split) are applied up front so that megatron reads into views of
    the parameters instead of into separate tensors it would then concatenate (a second copy of most experts)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_sapo.checkpoint import load_sharded

    sharded = {"model": chunks[0].sharded_state_dict()}
    apply_factories(sharded)
    loaded = load_sharded(sharded, ckpt_dir, field=field)

    def pairs(expected, got):
        if isinstance(expected, dict):
            for key, value in expected.items():
                yield from pairs(value, got[key])
        elif isinstance(expected, list):
            for value, other in zip(expected, got, strict=True):
                yield from pairs(value, other)
        elif isinstance(expected, ShardedTensor):
            yield expected.data, got

    with torch.no_grad():
        for target, value in pairs(sharded, loaded):
            if value.data_ptr() != target.data_ptr():  # megatron read into a tensor of its own
                target.copy_(value)


def full_megatron_shape(rule: WeightRule, layer: int | None, expert: int | None, arch: ModelArch) -> torch.Size:
    shapes = hf_shapes(arch)
    meta = [torch.empty(shapes[n], device="meta") for n in hf_names(rule, layer, expert)]
    return merge_hf(rule, meta, arch).shape


@torch.no_grad()
def export_hf_weights(chunks: list[torch.nn.Module], arch: ModelArch, *,
                      all_ranks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Yield every HF tensor (full, unpadded, HF order) on global rank 0. Collective: all ranks iterate it.

    Of the data-parallel replicas only the first takes part in the gathers; the rank that ends up with a full
    tensor (TP/ETP rank 0 of the owning stage and expert-parallel rank) sends it to rank 0. ``all_ranks``: it
    broadcasts it instead, and every rank yields every tensor (colocated weight sync hands each rank's copy to the
    rollout server rank on the same device).
    """
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    weights = {w.key: w for w in local_weights(chunks, arch)}
    first_replica = {
        False: ps.get_data_parallel_rank(with_context_parallel=True) == 0,
        True: ps.get_expert_data_parallel_rank() == 0,
    }
    # Which rank assembles each full tensor: decided once, from every rank's own claims.
    claims = [key for key, w in weights.items() if w.tp_rank == 0 and first_replica[w.rule.is_expert]]
    all_claims: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_claims, claims)
    source = {key: r for r, keys in enumerate(all_claims) for key in keys}
    some_param = next(iter(weights.values())).param

    for rule, layer, expert in iter_hf_params(arch):
        key = (WEIGHT_RULES.index(rule), layer, expert)
        weight = weights.get(key)
        full = None
        if weight is not None and first_replica[rule.is_expert]:
            shards = [torch.empty_like(weight.param) for _ in range(weight.tp_size)]
            if weight.tp_size > 1:
                dist.all_gather(shards, weight.param.data.contiguous(), group=weight.tp_group)
            else:
                shards = [weight.param.data]
            full = unshard(rule, shards)
        src = source[key]
        if all_ranks:
            if rank == src:
                full = full.contiguous()
            else:
                shape = full_megatron_shape(rule, layer, expert, arch)
                full = torch.empty(shape, dtype=some_param.dtype, device=some_param.device)
            dist.broadcast(full, src=src)
            yield from zip(hf_names(rule, layer, expert), split_megatron(rule, full, arch))
            continue
        if src != 0:
            if rank == src:
                dist.send(full.contiguous(), dst=0)
            elif rank == 0:
                shape = full_megatron_shape(rule, layer, expert, arch)
                full = torch.empty(shape, dtype=some_param.dtype, device=some_param.device)
                dist.recv(full, src=src)
        if rank == 0:
            yield from zip(hf_names(rule, layer, expert), split_megatron(rule, full, arch))
