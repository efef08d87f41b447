"""Log-probabilities and entropy of target tokens from vocab-parallel (tensor-parallel sharded) logits.

Rank ``r`` of the TP group holds the contiguous vocabulary slice ``[r * V_local, (r + 1) * V_local)``. The full
vocabulary is never gathered: each rank reduces its shard to a few numbers per token (its max, its sum of
exponentials, its sum of ``p * logit``, and the target logit if it owns the target) and two all-reduces over
``[tokens]``-sized tensors combine them. The backward pass is exact and local to the shard.

Memory: nothing of size ``[tokens, V_local]`` is kept between forward and backward beyond the caller's own logits;
the backward recomputes the softmax from the logits and one or two saved scalars per token. With ``chunk_size`` the
float32 temporaries are ``[chunk_size, V_local]`` instead of ``[tokens, V_local]``, so the extra memory of
forward + backward is the logits gradient (one shard, in the logits' dtype; none with ``inplace_backward``) plus a
few chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sapo.errors import InputError


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``target_ids`` (and the entropy) under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V_local]``, this rank's contiguous vocab shard (the whole vocabulary when ``tp_group`` is
            None or has one rank). Any floating dtype; bf16/fp16 are computed in float32.
        target_ids: ``[...]`` global token ids, each ``< vocab_size``.
        tp_group: the tensor-parallel group the vocabulary is split over.
        vocab_size: the unpadded vocabulary; global columns at or past it are Megatron's padding and get no
            probability and zero gradient. Default: ``V_local * tp_size`` (no padding).
        temperature: logits are divided by it before the softmax; the gradient flows through the division.
        chunk_size: tokens processed at a time, bounding the float32 work space to ``[chunk_size, V_local]``.
            None processes all tokens at once.
        return_entropy: also return the entropy of the tempered distribution (differentiable).
        inplace_backward: write the logits gradient into the logits' own storage (as Megatron's cross entropy does),
            saving a ``[tokens, V_local]`` buffer. Only for logits nothing else reads after this call's backward,
            e.g. the output layer's result; autograd raises if another saved use of them runs backward later.

    Returns:
        log-probs ``[...]`` in float32 (float64 for float64 logits), or ``(log_probs, entropy)``.
    """
    _check_tensors(logits, target_ids)
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    local_vocab = logits.shape[-1]
    vocab_size = local_vocab * tp_size if vocab_size is None else vocab_size
    _check_options(vocab_size, local_vocab * tp_size, temperature, chunk_size)

    vocab_start = tp_rank * local_vocab
    # Padding is the tail of the global vocabulary, so this shard's real columns are a prefix of it.
    num_valid = max(0, min(local_vocab, vocab_size - vocab_start))
    num_tokens = target_ids.numel()
    outputs = _VocabParallelLogProbs.apply(
        logits.reshape(num_tokens, local_vocab),
        target_ids.reshape(num_tokens),
        tp_group if tp_size > 1 else None,
        vocab_start,
        num_valid,
        float(temperature),
        chunk_size or max(num_tokens, 1),
        return_entropy,
        inplace_backward,
    )
    if return_entropy:
        log_probs, entropy = outputs
        return log_probs.view(target_ids.shape), entropy.view(target_ids.shape)
    return outputs.view(target_ids.shape)


def _check_tensors(logits: torch.Tensor, target_ids: torch.Tensor) -> None:
    if not logits.is_floating_point() or logits.dim() == 0:
        raise InputError(f"logits: expected a floating tensor [..., V_local], got {logits.dtype} {tuple(logits.shape)}")
    if target_ids.is_floating_point() or target_ids.is_complex():
        raise InputError(f"target_ids: expected integer token ids, got {target_ids.dtype}; pass a long tensor")
    if tuple(target_ids.shape) != tuple(logits.shape[:-1]):
        raise InputError(
            f"target_ids: shape {tuple(target_ids.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )


def _check_options(vocab_size: int, padded_vocab_size: int, temperature: float, chunk_size: int | None) -> None:
    if not 1 <= vocab_size <= padded_vocab_size:
        raise InputError(
            f"vocab_size: {vocab_size} must be in [1, V_local * tp_size = {padded_vocab_size}]; pass the unpadded vocab"
        )
    if not temperature > 0:
        raise InputError(f"temperature: {temperature} must be > 0; use 1.0 for the plain softmax")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size: {chunk_size} must be a positive number of tokens, or None for no chunking")


def _tempered_minus(logits: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(logits - shift[:, None]) / temperature`` as a fresh tensor of ``shift``'s dtype (float32 for bf16 logits)."""
    if logits.dtype == shift.dtype:
        out = logits - shift[:, None]
    else:
        # Upcast first: a mixed-dtype subtraction would make its own hidden float32 copy of the chunk on CPU.
        out = logits.to(shift.dtype).sub_(shift[:, None])
    return out if temperature == 1.0 else out.div_(temperature)


def _local_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``softmax(logits / temperature)`` over this shard's columns only, in ``dtype``, with the fused kernel."""
    if temperature == 1.0:
        return torch.softmax(logits, dim=-1, dtype=dtype)
    return torch.softmax(logits.to(dtype, copy=True).div_(temperature), dim=-1)


class _VocabParallelLogProbs(torch.autograd.Function):
    """Target log-prob (and entropy) over a TP-sharded vocabulary; inputs are flattened to ``[tokens, V_local]``.

    Backward needs the global softmax ``p`` over the shard. Rather than keep a ``[tokens, V_local]`` softmax from
    forward, it recomputes the shard-local softmax with the fused kernel (one read of the logits) and rescales it by
    this shard's share of the global normaliser, one scalar per token saved by forward: ``p = softmax_local * share``.
    The entropy gradient also needs ``log p``, recomputed from the logits and the saved per-token logsumexp.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        group: dist.ProcessGroup | None,
        vocab_start: int,
        num_valid: int,
        temperature: float,
        chunk_size: int,
        return_entropy: bool,
        inplace_backward: bool,
    ):
        ctx.set_materialize_grads(False)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        num_tokens = logits.shape[0]
        owned = (targets >= vocab_start) & (targets < vocab_start + num_valid)
        local_targets = torch.where(owned, targets - vocab_start, 0).long()

        # Per token, relative to this shard's own max m (s = logit / T): sum(exp(s - m)), sum(exp(s - m) * (s - m)),
        # and the raw target logit.
        local_max = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=logits.device)
        sum_exp = torch.zeros(num_tokens, dtype=dtype, device=logits.device)
        sum_exp_dot = torch.zeros_like(sum_exp) if return_entropy else None
        target_logit = torch.zeros_like(sum_exp)
        for start in range(0, num_tokens if num_valid > 0 else 0, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = logits[rows, :num_valid]
            local_max[rows] = chunk.amax(dim=-1).to(dtype)
            shifted = _tempered_minus(chunk, local_max[rows], temperature)
            if return_entropy:
                exp = torch.exp(shifted)
                sum_exp_dot[rows] = torch.einsum("nv,nv->n", exp, shifted)
            else:
                exp = shifted.exp_()
            sum_exp[rows] = exp.sum(dim=-1)
            target_logit[rows] = chunk.gather(-1, local_targets[rows, None]).squeeze(-1).to(dtype)
            del shifted, exp  # before the next chunk allocates: one chunk of temporaries at a time

        global_max = local_max.clone()
        if group is not None:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # Re-express this shard's sums relative to the global max so that the ranks' partial sums add up.
        # A shard with no real columns has local_max = -inf and contributes exactly zero.
        offset = (local_max - global_max) / temperature
        local_sum_exp = sum_exp * torch.exp(offset)
        partials = [local_sum_exp, torch.where(owned, (target_logit - global_max) / temperature, 0.0)]
        if return_entropy:
            dot = torch.exp(offset) * (sum_exp_dot + sum_exp * offset)
            partials.append(torch.where(torch.isfinite(local_max), dot, 0.0))
        packed = torch.stack(partials, dim=-1)
        if group is not None:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)

        # Everything below is relative to global_max / T.
        logsumexp = torch.log(packed[:, 0])
        log_probs = packed[:, 1] - logsumexp
        share = local_sum_exp / packed[:, 0]
        ctx.temperature, ctx.chunk_size, ctx.num_valid = temperature, chunk_size, num_valid
        ctx.inplace_backward = inplace_backward
        if not return_entropy:
            ctx.save_for_backward(logits, local_targets, owned, share)
            return log_probs
        entropy = logsumexp - packed[:, 2] / packed[:, 0]
        # log p = (logit - lse_shift) / T, with lse_shift in raw-logit units.
        lse_shift = global_max + temperature * logsumexp
        ctx.save_for_backward(logits, local_targets, owned, share, lse_shift, entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None = None):
        logits, local_targets, owned, share, *entropy_terms = ctx.saved_tensors
        temperature, chunk_size, num_valid = ctx.temperature, ctx.chunk_size, ctx.num_valid
        # In place, each chunk of logits is read before its gradient overwrites it.
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)
        grad_logits[:, num_valid:] = 0
        if grad_log_probs is None:
            grad_log_probs = torch.zeros_like(share)

        # With s = logit / T and log p = s - logsumexp:
        #   d log p[target] / d s_j = onehot_j - p_j
        #   d entropy / d s_j      = -p_j * (log p_j + entropy)
        # so d/d logit_j = p_j * (a * log p_j + b) + c * onehot_j, with the per-token scalars below, and
        # p_j = softmax_local_j * share.
        c = grad_log_probs / temperature
        b = -c
        a = None
        if grad_entropy is not None:
            lse_shift, entropy = entropy_terms
            a = -grad_entropy / temperature
            b = b + a * entropy
        target_grad = torch.where(owned, c, 0.0)[:, None]

        in_gradient = logits.dtype == share.dtype  # write the product straight into the gradient
        for start in range(0, logits.shape[0] if num_valid > 0 else 0, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = logits[rows, :num_valid]
            grad_chunk = grad_logits[rows, :num_valid]
            weight = (b * share)[rows, None]
            if a is not None:
                log_p = _tempered_minus(chunk, lse_shift[rows], temperature)
                weight = log_p.mul_((a * share)[rows, None]).add_(weight)
            local_softmax = _local_softmax(chunk, temperature, share.dtype)
            grad = torch.mul(local_softmax, weight, out=grad_chunk if in_gradient else local_softmax)
            grad.scatter_add_(-1, local_targets[rows, None], target_grad[rows])
            if not in_gradient:
                grad_chunk.copy_(grad)
            del weight, local_softmax, grad  # before the next chunk allocates
        return grad_logits, None, None, None, None, None, None, None, None
