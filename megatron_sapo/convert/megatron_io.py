"""HF tensors ⇄ a sharded Megatron model, through the mapping table.

``load_hf_weights`` fills each rank's parameter shards from an HF checkpoint (each rank reads only the tensors
its shards need). ``export_hf_weights`` is the reverse, used by the HF exporter and by the weight sync to the
rollout engine: a collective over all ranks that yields full HF-named tensors on global rank 0, gathering TP
(or expert-TP) shards inside the owning pipeline stage and sending the result to rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_sapo.convert.hf_io import HFCheckpointReader
from megatron_sapo.convert.mapping import (
    QWEN3_MOE_RULES,
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
from megatron_sapo.models.qwen3_moe import Qwen3MoeArch

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


def local_weights(chunks: list[torch.nn.Module], arch: Qwen3MoeArch) -> list[LocalWeight]:
    """This rank's parameters, each tied to its mapping rule and its global layer/expert numbers."""
    from megatron.core import parallel_state as ps

    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    num_local_experts = arch.num_experts // ep_size
    weights = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        global_layer = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
        for name, param in model.named_parameters():
            matched = match_megatron_name(name)
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
            key = (QWEN3_MOE_RULES.index(matched.rule), layer, expert)
            weights.append(LocalWeight(key, matched.rule, param, tp[0], tp[1], group))
    return weights


@torch.no_grad()
def load_hf_weights(
    chunks: list[torch.nn.Module], reader: HFCheckpointReader, arch: Qwen3MoeArch, progress: bool = True
) -> None:
    """Copy an HF checkpoint into this rank's shards. The reader must have been validated against ``arch``."""
    weights = local_weights(chunks, arch)
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    for weight in tqdm(weights, desc="tensors converted", unit="tensor", disable=not show):
        _, layer, expert = weight.key
        full = merge_hf(weight.rule, [reader.get(n) for n in hf_names(weight.rule, layer, expert)], arch)
        local = shard(weight.rule, full, weight.tp_rank, weight.tp_size)
        if local.shape != weight.param.shape:
            raise RuntimeError(f"{hf_names(weight.rule, layer, expert)} → shard {list(local.shape)} "
                               f"does not fit parameter {list(weight.param.shape)}")  # fmt: skip
        weight.param.copy_(local)


def full_megatron_shape(rule: WeightRule, layer: int | None, expert: int | None, arch: Qwen3MoeArch) -> torch.Size:
    shapes = hf_shapes(arch)
    meta = [torch.empty(shapes[n], device="meta") for n in hf_names(rule, layer, expert)]
    return merge_hf(rule, meta, arch).shape


@torch.no_grad()
def export_hf_weights(chunks: list[torch.nn.Module], arch: Qwen3MoeArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every HF tensor (full, unpadded, HF order) on global rank 0. Collective: all ranks iterate it.

    Of the data-parallel replicas only the first takes part in the gathers; the rank that ends up with a full
    tensor (TP/ETP rank 0 of the owning stage and expert-parallel rank) sends it to rank 0.
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
        key = (QWEN3_MOE_RULES.index(rule), layer, expert)
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
        if src != 0:
            if rank == src:
                dist.send(full.contiguous(), dst=0)
            elif rank == 0:
                shape = full_megatron_shape(rule, layer, expert, arch)
                full = torch.empty(shape, dtype=some_param.dtype, device=some_param.device)
                dist.recv(full, src=src)
        if rank == 0:
            yield from zip(hf_names(rule, layer, expert), split_megatron(rule, full, arch))
