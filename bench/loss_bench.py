"""Benchmark the RL loss on vocab-parallel logits: forward + backward time and peak extra memory.

Four ways to get the target tokens' log-probs from this rank's logits shard, each followed by the same
``policy_loss("sapo")`` and a backward pass to the shard:

- ours:         ``vocab_parallel_log_probs`` (max / sum-exp / target all-reduces, recompute in backward, chunked);
- ours_inplace: the same with ``inplace_backward=True`` (the gradient overwrites the logits, as Megatron's does);
- megatron:     Megatron-Core's ``vocab_parallel_cross_entropy`` on the same shard: the same passes, the floor;
- gather:       all-gather the full vocabulary and ``log_softmax`` it in fp32.

Run (CPU, about a minute)::

    python -m torch.distributed.run --nproc_per_node=2 bench/loss_bench.py

Realistic GPU shapes (Qwen3's 151936-token vocab, TP=8, 16k tokens per micro-batch)::

    torchrun --nproc_per_node=8 bench/loss_bench.py --tokens 16384 --chunk-size 2048 --iters 10

Peak extra memory is the highest number of bytes allocated at any point of forward + backward on top of what was
allocated before it (the logits shard and the loss inputs); it includes the logits gradient the backward returns.
On CUDA it is ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before. On CPU, where PyTorch keeps
no allocator statistics, it is the running sum of the profiler's allocation/free events (``profile_memory=True``)
over the same region, in time order: every tensor allocated and freed inside it is counted, nothing before it.
Times are medians over ``--iters`` runs, the methods taking turns; on CPU glibc is told to keep freed memory
(``keep_freed_memory``) so that, as with a GPU's caching allocator, a fresh buffer costs no page faults.

The header names the hardware: on CPU the model and whether it has AVX-512 and native bf16 arithmetic
(``avx512_bf16``/``amx_bf16``), which decide how fast bf16 logits are read and converted; on GPU its name and HBM peak.
"Achieved GB/s" counts the bytes a fused forward + backward must at least move, three times the shard (read the
logits in forward and in backward, write their gradient), over the measured time. ``--profile`` adds the top
operators of ours and megatron's, by self time; ``--json PATH`` writes the numbers (bench/gpu_smoke.py reads them).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch.profiler import ProfilerActivity, profile

from megatron_sapo.loss import policy_loss, vocab_parallel_log_probs

# One way to get (log-probs, logits gradient) from a logits shard.
Step = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Megatron pads the vocabulary to a multiple of this times the TP size (--make-vocab-size-divisible-by).
VOCAB_DIVISIBLE_BY = 128


class _GatherVocab(torch.autograd.Function):
    """All-gather the vocab shards along the last dim. Every rank computes the same loss from the full logits, so
    the gradient for this rank's shard is its own slice of the full gradient (Megatron's gather-from-TP-region)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.start, ctx.width = dist.get_rank(group) * shard.shape[-1], shard.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[..., ctx.start : ctx.start + ctx.width].contiguous(), None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch (batch * response_len)")
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936, help="unpadded vocabulary (Qwen3: 151936)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the logits")
    parser.add_argument(
        "--chunk-size", type=int, default=32, help="tokens per chunk for ours (0: none); CPU: 32 fits L3, GPU: ~2048"
    )
    parser.add_argument("--entropy", action="store_true", help="ours also returns the entropy (used as a bonus)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--gather-iters", type=int, default=1, help="timed runs of the (much slower) gather baseline, no warm-up"
    )
    parser.add_argument("--profile", action="store_true", help="print the top operators of ours and megatron's")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args()


# HBM bandwidth by GPU name (vendor data sheets, TB/s); unknown GPUs print no share of peak.
HBM_PEAK_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.56}


def hardware() -> tuple[str, float | None]:
    """One line naming the device the benchmark ran on, and its memory bandwidth peak in bytes/s (GPU only)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((tbps for key, tbps in HBM_PEAK_TBPS.items() if key in name), None)
        return f"GPU: {name}, HBM peak {f'{peak} TB/s' if peak else 'unknown'}", peak and peak * 1e12
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    has = {flag: flag in flags for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}
    listed = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in has.items())
    return (f"CPU: {model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads/rank; {listed}; "
            f"torch kernels {torch.backends.cpu.get_cpu_capability()}"), None  # fmt: skip


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    allocator_caches = use_cuda or keep_freed_memory()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    tp = dist.get_world_size()
    # Works as is on CPU/gloo with megatron-core 0.16: it only creates process groups.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    multiple = VOCAB_DIVISIBLE_BY * tp
    padded_vocab = -(-args.vocab // multiple) * multiple
    local_vocab = padded_vocab // tp
    batch = args.tokens // args.response_len
    tokens = batch * args.response_len

    gen = torch.Generator().manual_seed(1234 + rank)
    base = (3 * torch.randn(tokens, local_vocab, generator=gen)).to(dtype).to(device)
    # Megatron's cross entropy does not know about the padded columns: make them impossible so all methods agree.
    base[:, max(0, min(local_vocab, args.vocab - rank * local_vocab)) :] = float("-inf")
    torch.manual_seed(1234)  # same targets and loss inputs on every TP rank
    targets = torch.randint(0, args.vocab, (tokens,), device=device)
    advantages = torch.randn(batch, 1, device=device).expand(batch, args.response_len).contiguous()
    lengths = torch.randint(args.response_len // 2, args.response_len + 1, (batch, 1), device=device)
    mask = (torch.arange(args.response_len, device=device) < lengths).float()
    with torch.no_grad():  # the full-vocabulary log_softmax every method's log-probs are checked against
        full = _GatherVocab.apply(base, group)[..., : args.vocab].float()
        reference = torch.log_softmax(full, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        del full
    old_log_probs = (reference + 0.05 * torch.randn(tokens, device=device)).view(batch, args.response_len)

    def sapo_backward(
        shard: torch.Tensor, log_probs: torch.Tensor, entropy: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The SAPO loss and its gradient for the shard, handed back as the output layer's backward would get it
        (``autograd.grad``, not ``.grad`` accumulation, which would copy a gradient that aliases the logits)."""
        loss, _ = policy_loss(
            "sapo",
            log_probs=log_probs.view(batch, args.response_len),
            old_log_probs=old_log_probs,
            advantages=advantages,
            response_mask=mask,
            entropy=None if entropy is None else entropy.view(batch, args.response_len),
            entropy_coef=0.0 if entropy is None else 1e-3,
        )
        (grad_logits,) = torch.autograd.grad(loss, shard)
        return log_probs.detach(), grad_logits

    def ours(shard: torch.Tensor, inplace_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        out = vocab_parallel_log_probs(
            shard,
            targets,
            tp_group=group,
            vocab_size=args.vocab,
            chunk_size=args.chunk_size or None,
            return_entropy=args.entropy,
            inplace_backward=inplace_backward,
        )
        log_probs, entropy = out if args.entropy else (out, None)
        return sapo_backward(shard, log_probs, entropy)

    def ours_inplace(shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ours(shard, inplace_backward=True)

    def megatron(shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Megatron works in place on fp32 logits (its softmax, then its gradient, reuse the logits' storage).
        return sapo_backward(shard, -vocab_parallel_cross_entropy(shard, targets))

    def gather(shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = _GatherVocab.apply(shard, group)[..., : args.vocab]
        log_probs = torch.log_softmax(full.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        return sapo_backward(shard, log_probs)

    methods: dict[str, Step] = {
        "ours": ours,
        "ours_inplace": ours_inplace,
        "megatron": megatron,
        "gather": gather,
    }
    shard_bytes = base.numel() * base.element_size()
    fast = {name: method for name, method in methods.items() if name != "gather"}
    seconds = median_seconds(fast, base, args.warmup, args.iters, device)
    seconds.update(median_seconds({"gather": gather}, base, 0, args.gather_iters, device))
    results = {}
    for name, method in methods.items():
        peak, (log_probs, _) = peak_extra_bytes(method, base.clone().requires_grad_(), device)
        max_diff = (log_probs.float() - reference).abs().max()
        results[name] = (max_across_ranks(seconds[name]), max_across_ranks(peak), max_across_ranks(max_diff))

    if args.profile:
        profiles = {name: top_operators(methods[name], base, device) for name in ("ours_inplace", "megatron")}
    if dist.get_rank() == 0:
        line, peak_bandwidth = hardware()
        print(line)
        report(args, tp, tokens, local_vocab, padded_vocab, shard_bytes, results, peak_bandwidth)
        if args.profile:
            for name, table in profiles.items():
                print(f"--- {name}: top operators by self time (rank 0, one run) ---\n{table}")
        if args.json:
            write_json(args.json, tokens, local_vocab, shard_bytes, results, peak_bandwidth)
        if not allocator_caches:
            print("note: freed CPU memory goes back to the OS, so times include page faults on fresh buffers")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    methods: dict[str, Step], base: torch.Tensor, warmup: int, iters: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each method's forward + backward on a fresh copy of the logits shard (a method may
    overwrite it). The methods take turns within each iteration so that drift in machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(warmup + iters):
        for name, method in methods.items():
            shard = base.clone().requires_grad_()
            sync(device)
            dist.barrier()
            start = time.perf_counter()
            method(shard)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            del shard
    return {name: statistics.median(samples) for name, samples in times.items()}


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory rather than unmap every large block, so a fresh buffer is not page-faulted in
    again each step. That is the CPU counterpart of a GPU's caching allocator; without it CPU times mostly measure
    the kernel zeroing pages for whichever method allocates more. Returns whether it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def peak_extra_bytes(method: Step, shard: torch.Tensor, device: torch.device) -> tuple[int, tuple[torch.Tensor, ...]]:
    """Peak bytes allocated during ``method(shard)`` above what was allocated before it, and its result."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = method(shard)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = method(shard)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, out


def max_across_ranks(value: float | int | torch.Tensor) -> float:
    tensor = torch.tensor(float(value), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def top_operators(method: Step, base: torch.Tensor, device: torch.device, rows: int = 8) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        method(base.clone().requires_grad_())
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40)


def achieved_gbps(seconds: float, shard_bytes: int) -> float:
    return 3 * shard_bytes / seconds / 1e9


def write_json(path, tokens, local_vocab, shard_bytes, results, peak_bandwidth) -> None:
    methods = {name: {"ms": seconds * 1e3, "peak_extra_bytes": peak, "max_diff": diff,
                      "gbps": achieved_gbps(seconds, shard_bytes)}
               for name, (seconds, peak, diff) in results.items()}  # fmt: skip
    with open(path, "w") as f:
        json.dump({"shape": f"[{tokens}, {local_vocab}]", "shard_bytes": shard_bytes, "hbm_peak": peak_bandwidth,
                   "hardware": hardware()[0], "methods": methods}, f, indent=1)  # fmt: skip


def report(args, tp, tokens, local_vocab, padded_vocab, shard_bytes, results, peak_bandwidth=None) -> None:
    mib = 2**20
    print(
        f"TP={tp} tokens={tokens} vocab={args.vocab} (padded {padded_vocab}, {local_vocab}/rank) "
        f"logits={args.dtype} chunk={args.chunk_size or 'none'} entropy={args.entropy} iters={args.iters}; "
        f"shard = {shard_bytes / mib:.1f} MiB/rank"
    )
    print(f"{'method':<14}{'fwd+bwd ms':>12}{'peak extra MiB':>16}{'/ shard':>9}{'max |logp - full log_softmax|':>31}"
          f"{'GB/s':>8}" + (f"{'% peak':>8}" if peak_bandwidth else ""))  # fmt: skip
    for name, (seconds, peak, diff) in results.items():
        gbps = achieved_gbps(seconds, shard_bytes)
        share = f"{100 * gbps * 1e9 / peak_bandwidth:>8.1f}" if peak_bandwidth else ""
        print(f"{name:<14}{seconds * 1e3:>12.1f}{peak / mib:>16.1f}{peak / shard_bytes:>9.2f}{diff:>31.2e}"
              f"{gbps:>8.1f}{share}")  # fmt: skip
    megatron, gather = results["megatron"], results["gather"]
    for name in ("ours", "ours_inplace"):
        seconds, peak, _ = results[name]
        print(
            f"{name}: time / megatron = {seconds / megatron[0]:.2f} (target <= 1.2), time / gather = "
            f"{seconds / gather[0]:.2f}; peak extra / shard = {peak / shard_bytes:.2f} (target <= 1), "
            f"/ gather = {peak / gather[1]:.2f}"
        )


if __name__ == "__main__":
    main()
