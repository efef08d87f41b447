"""vocab_parallel_log_probs against torch.log_softmax over the full vocabulary in fp64, in one process and at TP=2."""

from __future__ import annotations

import pytest
import torch
from torchrun import torchrun

from megatron_sapo.errors import InputError
from megatron_sapo.loss import vocab_parallel_log_probs


def reference(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, temperature: float):
    """fp64 log-prob of the targets and entropy, over the unpadded columns only."""
    log_softmax = torch.log_softmax(logits.double()[..., :vocab_size] / temperature, dim=-1)
    log_probs = log_softmax.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_probs, entropy


def reference_grad(logits, targets, vocab_size, temperature, grad_log_probs, grad_entropy):
    """d(sum(grad_log_probs * log_probs + grad_entropy * entropy)) / d logits over the padded width, via autograd."""
    leaf = logits.double().detach().requires_grad_()
    log_probs, entropy = reference(leaf, targets, vocab_size, temperature)
    objective = (log_probs * grad_log_probs).sum()
    if grad_entropy is not None:
        objective = objective + (entropy * grad_entropy).sum()
    objective.backward()
    return leaf.grad


def run(logits, targets, *, vocab_size, temperature, chunk_size, return_entropy, grad_log_probs, grad_entropy):
    leaf = logits.detach().requires_grad_()
    out = vocab_parallel_log_probs(
        leaf,
        targets,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
    )
    log_probs, entropy = out if return_entropy else (out, None)
    objective = (log_probs.double() * grad_log_probs).sum()
    if return_entropy:
        objective = objective + (entropy.double() * grad_entropy).sum()
    objective.backward()
    return log_probs, entropy, leaf.grad


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("vocab_size,temperature", [(23, 1.0), (19, 0.6), (19, 1.7)])
@pytest.mark.parametrize("return_entropy", [True, False])
def test_single_process_fp64_matches_log_softmax(chunk_size, vocab_size, temperature, return_entropy):
    gen = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(3, 5, 23, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab_size, (3, 5), generator=gen)
    g_lp = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(3, 5, generator=gen, dtype=torch.float64) if return_entropy else None

    log_probs, entropy, grad = run(
        logits,
        targets,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
        grad_log_probs=g_lp,
        grad_entropy=g_ent,
    )
    ref_lp, ref_ent = reference(logits, targets, vocab_size, temperature)
    ref_grad = reference_grad(logits, targets, vocab_size, temperature, g_lp, g_ent)
    assert log_probs.dtype == torch.float64 and grad.dtype == torch.float64
    assert log_probs.shape == (3, 5)
    torch.testing.assert_close(log_probs, ref_lp, rtol=0, atol=1e-12)
    if return_entropy:
        torch.testing.assert_close(entropy, ref_ent, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    # Padded columns never get gradient.
    assert torch.all(grad[..., vocab_size:] == 0)


def test_padded_columns_get_no_probability():
    # Every real token's probability, with huge logits on the padding: they must sum to 1 over the real vocab.
    vocab_size, padded = 11, 16
    logits = torch.randn(1, padded, dtype=torch.float64).expand(vocab_size, padded).clone()
    logits[:, vocab_size:] = 50.0
    log_probs = vocab_parallel_log_probs(logits, torch.arange(vocab_size), vocab_size=vocab_size, chunk_size=3)
    assert abs(log_probs.exp().sum().item() - 1.0) < 1e-12


# Tempered logits reach ~30 here, so fp32 arithmetic alone is good to about 30 * 1.2e-7 * a few.
FP32_ATOL = 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits_are_computed_in_fp32(dtype):
    gen = torch.Generator().manual_seed(7)
    logits = (6 * torch.randn(4, 6, 37, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, 31, (4, 6), generator=gen)
    g_lp = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(4, 6, generator=gen, dtype=torch.float64)

    log_probs, entropy, grad = run(
        logits,
        targets,
        vocab_size=31,
        temperature=0.8,
        chunk_size=5,
        return_entropy=True,
        grad_log_probs=g_lp,
        grad_entropy=g_ent,
    )
    # The reference sees the same rounded logits, in fp64: what is left is the fp32 arithmetic.
    ref_lp, ref_ent = reference(logits, targets, 31, 0.8)
    ref_grad = reference_grad(logits, targets, 31, 0.8, g_lp, g_ent)
    assert log_probs.dtype == torch.float32 and entropy.dtype == torch.float32
    assert grad.dtype == dtype
    torch.testing.assert_close(log_probs.double(), ref_lp, rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(entropy.double(), ref_ent, rtol=0, atol=FP32_ATOL)
    # The gradient is rounded once to the logits' dtype: within half an ulp of it, plus the fp32 error.
    ulp = torch.finfo(dtype).eps
    assert torch.all((grad.double() - ref_grad).abs() <= ulp * ref_grad.abs() + FP32_ATOL)


def test_gradcheck_with_entropy_temperature_and_chunks():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=gen)

    def fn(x):
        return vocab_parallel_log_probs(x, targets, vocab_size=7, temperature=0.9, chunk_size=2, return_entropy=True)

    assert torch.autograd.gradcheck(fn, (logits,))


def test_entropy_only_backward():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 10, (4,), generator=gen)
    _, entropy = vocab_parallel_log_probs(logits, targets, return_entropy=True)
    entropy.sum().backward()
    expected = reference_grad(logits, targets, 10, 1.0, torch.zeros(4, dtype=torch.float64), torch.ones(4))
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inplace_backward_writes_the_same_gradient_into_the_logits(dtype):
    gen = torch.Generator().manual_seed(13)
    weights = torch.randn(6, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    targets = torch.randint(0, 13, (6,), generator=gen)
    g_lp, g_ent = torch.randn(6, generator=gen), torch.randn(6, generator=gen)

    def grad_of_weights(inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = weights * 2  # a non-leaf, like the output layer's result
        log_probs, entropy = vocab_parallel_log_probs(
            logits,
            targets,
            vocab_size=13,
            temperature=0.8,
            chunk_size=4,
            return_entropy=True,
            inplace_backward=inplace_backward,
        )
        ((log_probs * g_lp).sum() + (entropy * g_ent).sum()).backward()
        grad, weights.grad = weights.grad, None
        return grad, logits.detach()

    expected, untouched = grad_of_weights(False)
    grad, overwritten = grad_of_weights(True)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(overwritten, expected / 2, rtol=0, atol=0)  # the logits now hold d loss / d logits
    assert not torch.equal(untouched, overwritten)


def test_inplace_backward_is_caught_when_the_logits_are_still_needed():
    logits = torch.randn(4, 8, dtype=torch.float64, requires_grad=True) * 1
    targets = torch.zeros(4, dtype=torch.long)
    needs_logits = vocab_parallel_log_probs(logits, targets)
    overwrites_logits = vocab_parallel_log_probs(logits, targets, inplace_backward=True)  # runs backward first
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (needs_logits + overwrites_logits).sum().backward()


@pytest.mark.parametrize(
    "kwargs,targets_shape,field",
    [
        ({}, (3, 4), "target_ids"),
        ({"temperature": 0.0}, (3,), "temperature"),
        ({"vocab_size": 9}, (3,), "vocab_size"),
        ({"vocab_size": 0}, (3,), "vocab_size"),
        ({"chunk_size": 0}, (3,), "chunk_size"),
    ],
)
def test_bad_input_raises(kwargs, targets_shape, field):
    with pytest.raises(InputError, match=f"^{field}:"):
        vocab_parallel_log_probs(torch.randn(3, 8), torch.zeros(targets_shape, dtype=torch.long), **kwargs)


def test_tp2_sharded_logits_match_full_vocab_log_softmax():
    results = torchrun("loss_vocab_parallel.py", nproc=2)
    assert len(results) == 5
    for name, case in results.items():
        logits = torch.tensor(case["logits"], dtype=torch.float64)
        targets = torch.tensor(case["targets"])
        vocab_size, temperature = case["vocab_size"], case["temperature"]
        g_lp = torch.tensor(case["grad_log_probs"], dtype=torch.float64)
        g_ent = None if case["grad_entropy"] is None else torch.tensor(case["grad_entropy"], dtype=torch.float64)
        ref_lp, ref_ent = reference(logits, targets, vocab_size, temperature)
        ref_grad = reference_grad(logits, targets, vocab_size, temperature, g_lp, g_ent)
        grad = torch.tensor(case["grad_logits"], dtype=torch.float64)

        bf16 = name.startswith("bf16")
        # fp64 shards agree with the one-process fp64 reference to rounding; bf16 ones to fp32 arithmetic.
        atol = FP32_ATOL if bf16 else 1e-12
        assert case["log_probs_dtype"] == ("torch.float32" if bf16 else "torch.float64"), name
        assert case["grad_dtype"] == ("torch.bfloat16" if bf16 else "torch.float64"), name
        torch.testing.assert_close(torch.tensor(case["log_probs"], dtype=torch.float64), ref_lp, rtol=0, atol=atol)
        if g_ent is not None:
            torch.testing.assert_close(torch.tensor(case["entropy"], dtype=torch.float64), ref_ent, rtol=0, atol=atol)
        if bf16:
            assert torch.all((grad - ref_grad).abs() <= torch.finfo(torch.bfloat16).eps * ref_grad.abs() + FP32_ATOL)
        else:
            torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
        assert torch.all(grad[..., vocab_size:] == 0), name
