"""Batched autoregressive decoding for the embedded server: left-padded prompts, a KV cache, per-request sampling.

Every request carries its own ``torch.Generator`` seeded from its ``sampling_seed``, and draws from it only for
its own tokens, so a seed gives the same tokens whatever else shares the batch (up to float noise in the logits,
~1e-7, which only matters for a draw that lands on a probability boundary).

Sampling and the reported log-probs follow SGLang's sampler (``python/sglang/srt/layers/sampler.py``):

- temperature 0 is greedy (argmax), and the log-prob is ``log_softmax(logits)``, as SGLang turns it into top_k=1
  at temperature 1;
- otherwise the token is drawn from ``softmax(logits / T)`` restricted to the top-k tokens and then to the top-p
  nucleus (SGLang's torch path: drop a token when the mass before it already exceeds top_p), and the log-prob
  reported is ``log_softmax(logits / T)`` at that token, over the whole vocabulary (not renormalised over the
  top-k/top-p support), which is what the trainer recomputes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-6  # SGLang's _SAMPLING_EPS: temperatures below it are greedy


@dataclass
class DecodeRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None
    ignore_eos: bool = False  # the model's eos no longer stops; stop_token_ids still do


@dataclass
class DecodeResult:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # SGLang's finish_reason JSON: {"type": "stop", "matched": id} or {"type": "length", "length": n}
    finish_reason: dict | None = None
    routed_experts: torch.Tensor | None = None  # [prompt + output - 1, layers, top_k], see routed_experts.py


def pick_token(logits: torch.Tensor, request: DecodeRequest, generator: torch.Generator) -> tuple[int, float]:
    """Sample one token from a row of float32 logits; return it with its log-prob (see the module docstring)."""
    if request.temperature < GREEDY_EPS:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, dim=-1)[token])
    logprobs = torch.log_softmax(logits / request.temperature, dim=-1)
    probs = logprobs.exp()
    sorted_probs, order = probs.sort(descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if 0 < request.top_k < probs.numel():
        keep[request.top_k :] = False
    if request.top_p < 1.0:
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        keep &= mass_before <= request.top_p
    keep[0] = True  # the most likely token always survives
    support = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = int(torch.multinomial(support, 1, generator=generator))
    token = int(order[choice])
    return token, float(logprobs[token])


def _cache_kwarg(model) -> str:
    # transformers 5 names the KV cache argument ``cache``; 4.x calls it ``past_key_values``.
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_batch(model, requests: list[DecodeRequest], *, eos_token_ids: frozenset[int], pad_token_id: int = 0,
                 max_positions: int | None = None, between_steps=None) -> list[DecodeResult]:  # fmt: skip
    """Generate for every request together; each stops at its own stop token or length limit.

    ``between_steps(results)``, if given, runs before every forward pass with the partial results (the server pauses
    there and loads weights meanwhile) and returns ``{row: finish_reason}`` for rows to stop now (aborted ones)."""
    from transformers import DynamicCache

    if not requests:
        return []
    device = next(model.parameters()).device
    batch = len(requests)
    results = [DecodeResult() for _ in requests]
    generators = []
    for request in requests:
        generator = torch.Generator(device="cpu")
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed % 2**63)
        generators.append(generator)
    limits = []
    for request in requests:
        limit = request.max_new_tokens
        if max_positions is not None:
            limit = min(limit, max_positions - len(request.prompt_ids))
        limits.append(max(limit, 0))
    stops = [request.stop_token_ids | (frozenset() if request.ignore_eos else eos_token_ids) for request in requests]

    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, request in enumerate(requests):
        input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
        mask[row, width - len(request.prompt_ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_arg = _cache_kwarg(model)

    done = [limit == 0 for limit in limits]
    for row, limit in enumerate(limits):
        if limit == 0:
            results[row].finish_reason = {"type": "length", "length": 0}
    step_input, step_positions = input_ids, positions
    while not all(done):
        for row, reason in (between_steps(results) if between_steps else {}).items():
            if not done[row]:
                done[row] = True
                results[row].finish_reason = reason
        if all(done):
            break
        logits = (
            model(
                input_ids=step_input.to(device),
                attention_mask=mask.to(device),
                position_ids=step_positions.to(device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            )
            .logits[:, -1]
            .float()
            .cpu()
        )
        next_tokens = torch.full((batch,), pad_token_id, dtype=torch.long)
        for row, request in enumerate(requests):
            if done[row]:
                continue
            token, logprob = pick_token(logits[row], request, generators[row])
            result = results[row]
            result.output_ids.append(token)
            result.logprobs.append(logprob)
            next_tokens[row] = token
            if token in stops[row]:
                done[row] = True
                result.finish_reason = {"type": "stop", "matched": token}
            elif len(result.output_ids) >= limits[row]:
                done[row] = True
                result.finish_reason = {"type": "length", "length": limits[row]}
        # Finished rows keep decoding a pad token (their output is no longer read); keeping the batch intact is
        # simpler than reshaping the cache, and the embedded server only ever serves tiny models.
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        step_input = next_tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
    return results
