"""The HF ⇄ Megatron weight mapping of every supported family: one declarative row per parameter family.

The same table drives HF→Megatron import, Megatron→HF export and the weight sync to the rollout engine. A row
names the Megatron parameter (with the alternative names it has in Transformer Engine / grouped-GEMM specs), the
HF tensors it is made of, how they combine (``kind``) and the dimension TP shards (``tp_dim``; for expert weights
the expert-tensor-parallel group shards it and the expert-parallel group splits the experts). Rows that only some
architectures have say which :class:`ModelArch` feature they need (``needs``): q/k/v biases (Qwen2), qk-norm
(Qwen3, Qwen3-MoE), an untied ``lm_head``. A new family adds its provider module and, for tensors no row covers
yet, its rows here, gated by a new feature field.

Tied embeddings: the HF checkpoint has no ``lm_head.weight`` and the export writes none (SGLang 0.5.23's Qwen2/Qwen3
``load_weights`` fill their ``lm_head`` from ``model.embed_tokens.weight`` when ``tie_word_embeddings``, and
transformers ties it on load). With PP > 1 megatron keeps a copy of the embedding as ``output_layer.weight`` on the
last stage: it is imported from ``model.embed_tokens.weight`` too, and never exported (the first stage's embedding
is the tensor).

The functions below are pure: they turn full HF tensors into one rank's Megatron shard and full Megatron tensors
back into HF tensors; the distributed gathering lives in ``megatron_sapo.convert.megatron_io``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_sapo.models.arch import ModelArch

LAYER = "model.layers.{layer}."


@dataclass(frozen=True)
class WeightRule:
    megatron: tuple[str, ...]  # local-spec name first, then TE / grouped-GEMM spellings of the same parameter
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | vocab (pad/trim rows) | qkv (interleave per query group) | gate_up (SwiGLU fc1)
    tp_dim: int | None = None  # None: replicated across TP
    scope: str = "model"  # model (once) | layer (every layer) | moe (MoE layers, per expert) | dense (MLP layers)
    needs: str | None = None  # a bool ModelArch field the row exists for ("qkv_bias"), or "not <field>"
    exported: bool = True  # False: the parameter is a copy of another row's HF tensor (import only)

    def applies(self, arch: ModelArch) -> bool:
        if self.needs is None:
            return True
        field = self.needs.removeprefix("not ")
        return bool(getattr(arch, field)) != self.needs.startswith("not ")

    @property
    def is_expert(self) -> bool:
        return self.scope == "moe" and "{expert}" in self.megatron[0]


WEIGHT_RULES: tuple[WeightRule, ...] = (
    WeightRule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), "vocab", tp_dim=0),
    WeightRule(("decoder.final_layernorm.weight",), ("model.norm.weight",)),
    WeightRule(("output_layer.weight",), ("lm_head.weight",), "vocab", tp_dim=0, needs="not tie_word_embeddings"),
    # The last pipeline stage's copy of a tied embedding (megatron builds none with PP=1).
    WeightRule(("output_layer.weight",), ("model.embed_tokens.weight",), "vocab", tp_dim=0,
               needs="tie_word_embeddings", exported=False),  # fmt: skip
    WeightRule(
        (
            "decoder.layers.{layer}.input_layernorm.weight",
            "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
        ),
        (LAYER + "input_layernorm.weight",),
        scope="layer",
    ),
    WeightRule(
        ("decoder.layers.{layer}.self_attention.linear_qkv.weight",),
        (LAYER + "self_attn.q_proj.weight", LAYER + "self_attn.k_proj.weight", LAYER + "self_attn.v_proj.weight"),
        "qkv",
        tp_dim=0,
        scope="layer",
    ),
    WeightRule(
        ("decoder.layers.{layer}.self_attention.linear_qkv.bias",),
        (LAYER + "self_attn.q_proj.bias", LAYER + "self_attn.k_proj.bias", LAYER + "self_attn.v_proj.bias"),
        "qkv",
        tp_dim=0,
        scope="layer",
        needs="qkv_bias",
    ),
    WeightRule(
        ("decoder.layers.{layer}.self_attention.q_layernorm.weight",),
        (LAYER + "self_attn.q_norm.weight",),
        scope="layer",
        needs="qk_norm",
    ),
    WeightRule(
        ("decoder.layers.{layer}.self_attention.k_layernorm.weight",),
        (LAYER + "self_attn.k_norm.weight",),
        scope="layer",
        needs="qk_norm",
    ),
    WeightRule(
        ("decoder.layers.{layer}.self_attention.linear_proj.weight",),
        (LAYER + "self_attn.o_proj.weight",),
        tp_dim=1,
        scope="layer",
    ),
    WeightRule(
        ("decoder.layers.{layer}.pre_mlp_layernorm.weight", "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight"),
        (LAYER + "post_attention_layernorm.weight",),
        scope="layer",
    ),
    WeightRule(("decoder.layers.{layer}.mlp.router.weight",), (LAYER + "mlp.gate.weight",), scope="moe"),
    WeightRule(
        (
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
            "decoder.layers.{layer}.mlp.experts.linear_fc1.weight{expert}",
        ),
        (LAYER + "mlp.experts.{expert}.gate_proj.weight", LAYER + "mlp.experts.{expert}.up_proj.weight"),
        "gate_up",
        tp_dim=0,
        scope="moe",
    ),
    WeightRule(
        (
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight",
            "decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",
        ),
        (LAYER + "mlp.experts.{expert}.down_proj.weight",),
        tp_dim=1,
        scope="moe",
    ),
    # Dense MLP layers: every layer of a dense model; Qwen3-MoE's mlp_only_layers / decoder_sparse_step (30B-A3B: none).
    WeightRule(
        ("decoder.layers.{layer}.mlp.linear_fc1.weight",),
        (LAYER + "mlp.gate_proj.weight", LAYER + "mlp.up_proj.weight"),
        "gate_up",
        tp_dim=0,
        scope="dense",
    ),
    WeightRule(
        ("decoder.layers.{layer}.mlp.linear_fc2.weight",), (LAYER + "mlp.down_proj.weight",), tp_dim=1, scope="dense"
    ),
)


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(pattern + "$")


_MEGATRON_PATTERNS = [(rule, _template_regex(name)) for rule in WEIGHT_RULES for name in rule.megatron]


@dataclass(frozen=True)
class MatchedParam:
    rule: WeightRule
    layer: int | None  # as numbered in the name (local to a pipeline stage)
    expert: int | None  # as numbered in the name (local to an expert-parallel rank)


def match_megatron_name(name: str, arch: ModelArch | None = None) -> MatchedParam | None:
    """The rule (and the layer/expert numbers) behind a Megatron parameter name; None for non-weights. Without
    ``arch`` the first row of the name (``output_layer.weight``: the untied one) answers."""
    for rule, regex in _MEGATRON_PATTERNS:
        if arch is not None and not rule.applies(arch):
            continue
        m = regex.match(name)
        if m:
            groups = m.groupdict()
            layer, expert = groups.get("layer"), groups.get("expert")
            return MatchedParam(rule, int(layer) if layer else None, int(expert) if expert else None)
    return None


def hf_names(rule: WeightRule, layer: int | None = None, expert: int | None = None) -> list[str]:
    return [name.format(layer=layer, expert=expert) for name in rule.hf]


def iter_hf_params(arch: ModelArch) -> Iterator[tuple[WeightRule, int | None, int | None]]:
    """Every (rule, global layer, global expert) of a model's HF checkpoint, in HF checkpoint order."""
    rules = [r for r in WEIGHT_RULES if r.exported and r.applies(arch)]
    by_scope = {scope: [r for r in rules if r.scope == scope] for scope in ("model", "layer", "moe", "dense")}
    yield by_scope["model"][0], None, None  # embeddings first
    for layer, is_moe in enumerate(arch.moe_layer_pattern):
        for rule in by_scope["layer"]:
            yield rule, layer, None
        for rule in by_scope["moe" if is_moe else "dense"]:
            if rule.is_expert:
                for expert in range(arch.num_experts):
                    yield rule, layer, expert
            else:
                yield rule, layer, None
    yield from ((rule, None, None) for rule in by_scope["model"][1:])


def hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor an HF checkpoint of ``arch`` must contain."""
    h, d = arch.hidden_size, arch.head_dim
    shapes = {}
    per_rule = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (arch.vocab_size, h),
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (arch.num_key_value_heads * d, h),
        "self_attn.v_proj.weight": (arch.num_key_value_heads * d, h),
        "self_attn.q_proj.bias": (arch.num_attention_heads * d,),
        "self_attn.k_proj.bias": (arch.num_key_value_heads * d,),
        "self_attn.v_proj.bias": (arch.num_key_value_heads * d,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate.weight": (arch.num_experts, h),
        "gate_proj.weight": (arch.moe_intermediate_size, h),
        "up_proj.weight": (arch.moe_intermediate_size, h),
        "down_proj.weight": (h, arch.moe_intermediate_size),
    }
    dense = {
        "gate_proj.weight": (arch.intermediate_size, h),
        "up_proj.weight": (arch.intermediate_size, h),
        "down_proj.weight": (h, arch.intermediate_size),
    }
    for rule, layer, expert in iter_hf_params(arch):
        for name in hf_names(rule, layer, expert):
            suffix = next(k for k in per_rule if name.endswith(k))
            shapes[name] = dense[suffix] if rule.scope == "dense" else per_rule[suffix]
    return shapes


# --- HF tensors ⇄ one full Megatron tensor -------------------------------------------------------------------


def merge_hf(rule: WeightRule, tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """Combine a rule's HF tensors into the full (unsharded) Megatron tensor."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "vocab":
        (weight,) = tensors
        pad = weight.new_zeros(arch.padded_vocab_size - weight.shape[0], *weight.shape[1:])
        return torch.cat([weight, pad])
    if rule.kind == "gate_up":
        return torch.cat(tensors)
    if rule.kind == "qkv":
        # Megatron lays QKV out per query group: [q heads of group g, k_g, v_g] for g in groups, so that a
        # contiguous TP split hands each rank whole groups. Biases (1-D) interleave the same way.
        q, k, v = tensors
        groups, d, rest = arch.num_key_value_heads, arch.head_dim, q.shape[1:]
        q = q.reshape(groups, -1, d, *rest)
        k = k.reshape(groups, 1, d, *rest)
        v = v.reshape(groups, 1, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    raise ValueError(f"unknown mapping kind {rule.kind!r}")


def split_megatron(rule: WeightRule, tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """The inverse of :func:`merge_hf`: the rule's HF tensors from the full Megatron tensor."""
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "vocab":
        return [tensor[: arch.vocab_size]]
    if rule.kind == "gate_up":
        return list(tensor.chunk(2))
    if rule.kind == "qkv":
        groups, d = arch.num_key_value_heads, arch.head_dim
        per_group, rest = arch.num_attention_heads // groups, tensor.shape[1:]
        grouped = tensor.reshape(groups, per_group + 2, d, *rest)
        q, k, v = grouped.split([per_group, 1, 1], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    raise ValueError(f"unknown mapping kind {rule.kind!r}")


# --- one full Megatron tensor ⇄ TP shards ----------------------------------------------------------------------


def shard(rule: WeightRule, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor."""
    if rule.tp_dim is None or size == 1:
        return tensor
    if rule.kind == "gate_up":
        # Megatron's SwiGLU fc1 shard is [gate_r; up_r], not a contiguous slice of [gate; up].
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return tensor.chunk(size, dim=rule.tp_dim)[rank]


def unshard(rule: WeightRule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`shard`: the full tensor from every TP rank's slice, in rank order."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        gates, ups = zip(*(s.chunk(2) for s in shards))
        return torch.cat([*gates, *ups])
    return torch.cat(shards, dim=rule.tp_dim)


def count_parameters(chunks: list, arch: ModelArch) -> tuple[int, int]:
    """(total, active per token) parameters of this rank's chunks; active counts top-k of the routed experts.

    Vocab padding rows are not counted, nor the last stage's copy of a tied embedding, so that a single-rank count
    is the HF model's.
    """
    total = expert = padding = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            rule = match_megatron_name(name, arch).rule
            if not rule.exported:
                continue
            total += param.numel()
            if rule.is_expert:
                expert += param.numel()
            elif rule.kind == "vocab":
                padding += (arch.padded_vocab_size - arch.vocab_size) * param.shape[-1]
    active = total - expert + (expert * arch.num_experts_per_tok // arch.num_experts if arch.num_experts else 0)
    return total - padding, active - padding
