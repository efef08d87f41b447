"""A step's training samples and how they are cut into data-parallel shards and length-bucketed micro-batches.

Samples are kept *response-aligned*: per-token tensors are ``[num_samples, max_response_len]`` whose column ``j``
is response token ``j`` of each sample (zero past its end; ``response_mask`` says where). Sequences are never
padded to a batch-wide length: a micro-batch holds samples of similar length, padded only to its own longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

# rollout_is_weights and loss_mask come from algorithm.rollout_correction (importance weights, rejection); values
# and returns are the critic's (algorithm.adv_estimator=gae).
PER_TOKEN_FIELDS = ("advantages", "old_log_probs", "ref_log_probs", "rollout_log_probs", "rollout_is_weights",
                    "loss_mask", "values", "returns")  # fmt: skip
ROUTING_FIELDS = ("routed_experts", "replay_routing", "trainer_routing")


@dataclass
class Samples:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: torch.Tensor | None = None  # [n, R]
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    rollout_is_weights: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None  # response tokens that stay in the loss (1) after rejection sampling
    values: torch.Tensor | None = None  # the critic's values when the batch was made (GAE's, the clip's centre)
    returns: torch.Tensor | None = None  # GAE's returns: the critic's targets
    # MoE routing per sample, [positions, num_hidden_layers, top_k] (models/routing_replay.py): the rollout
    # engine's, the one the trainer replays (R3: the engine's, R2: its own old-log-prob pass's), and the one the
    # trainer's old-log-prob pass used.
    routed_experts: list[torch.Tensor] | None = None
    replay_routing: list[torch.Tensor] | None = None
    trainer_routing: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def max_response_len(self) -> int:
        return max((len(r) for r in self.response_ids), default=0)

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)]

    def response_mask(self, width: int | None = None) -> torch.Tensor:
        width = self.max_response_len if width is None else width
        lengths = torch.tensor([len(r) for r in self.response_ids])
        return (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()

    def select(self, indices: list[int]) -> "Samples":
        picked = {
            name: getattr(self, name)[indices] if getattr(self, name) is not None else None for name in PER_TOKEN_FIELDS
        }
        routings = {
            name: [getattr(self, name)[i] for i in indices] if getattr(self, name) is not None else None
            for name in ROUTING_FIELDS
        }
        return replace(
            self,
            prompt_ids=[self.prompt_ids[i] for i in indices],
            response_ids=[self.response_ids[i] for i in indices],
            **picked,
            **routings,
        )


def response_aligned(values: list[list[float]], width: int) -> torch.Tensor:
    """Per-token values of each response, zero-padded to ``width`` columns."""
    out = torch.zeros(len(values), width)
    for row, v in enumerate(values):
        out[row, : len(v)] = torch.tensor(v[:width], dtype=out.dtype)
    return out


def data_parallel_shard(lengths: list[int], dp_size: int, dp_rank: int) -> list[int]:
    """Indices of this DP rank's equal share, balanced in tokens: the samples are dealt out longest first, in
    snake order (ranks 0..d-1, then d-1..0, ...), which evens out token counts better than round-robin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mine = []
    for position, index in enumerate(order):
        block, offset = divmod(position, dp_size)
        if (offset if block % 2 == 0 else dp_size - 1 - offset) == dp_rank:
            mine.append(index)
    return sorted(mine)


def bucket_by_length(lengths: list[int], max_tokens: int, pad_multiple: int = 1) -> list[list[int]]:
    """Greedy length buckets: sorted by length, a bucket takes samples while (count × padded longest) fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            longest = _padded(max(lengths[j] for j in buckets[-1] + [i]), pad_multiple)
            if longest * (len(buckets[-1]) + 1) <= max_tokens:
                buckets[-1].append(i)
                continue
        buckets.append([i])
    return buckets


def split_to_count(buckets: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """Split the largest buckets in two until there are ``count`` of them (every DP rank must run as many)."""
    buckets = [list(b) for b in buckets]
    while len(buckets) < count:
        splittable = [b for b in buckets if len(b) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} micro-batches from {len(lengths)} samples")
        largest = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        buckets.remove(largest)
        half = len(largest) // 2
        buckets += [largest[:half], largest[half:]]
    return buckets


def _padded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


@dataclass
class MicroBatch:
    indices: list[int]  # into the Samples it was cut from
    tokens: torch.Tensor  # [b, T] prompt + response, right-padded
    positions: torch.Tensor  # [b, T]
    targets: torch.Tensor  # [b, T] next token at each position (0 at the end)
    response_index: torch.Tensor  # [b, R] position whose logits predict response token j
    response_mask: torch.Tensor  # [b, R]
    per_token: dict[str, torch.Tensor]  # PER_TOKEN_FIELDS present, [b, R]
    replay_routing: list[torch.Tensor] | None = None  # per row, for routing replay

    @property
    def loss_mask(self) -> torch.Tensor:
        """The response tokens the loss counts: ``response_mask`` less those rejection sampling dropped."""
        if "loss_mask" in self.per_token:
            return self.response_mask * self.per_token["loss_mask"]
        return self.response_mask


def make_micro_batch(samples: Samples, indices: list[int], pad_multiple: int, device) -> MicroBatch:
    part = samples.select(indices)
    width = part.max_response_len
    seq_len = _padded(max(part.lengths()), pad_multiple)
    tokens = torch.zeros(len(indices), seq_len, dtype=torch.long)
    response_index = torch.zeros(len(indices), width, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(part.prompt_ids, part.response_ids)):
        sequence = prompt + response
        tokens[row, : len(sequence)] = torch.tensor(sequence)
        # Causal LM: the logits at position p predict token p + 1.
        response_index[row] = (len(prompt) - 1 + torch.arange(width)).clamp(max=seq_len - 1)
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    per_token = {
        name: getattr(part, name)[:, :width].to(device) for name in PER_TOKEN_FIELDS if getattr(part, name) is not None
    }
    return MicroBatch(
        indices=indices,
        tokens=tokens.to(device),
        positions=torch.arange(seq_len).expand(len(indices), seq_len).to(device),
        targets=targets.to(device),
        response_index=response_index.to(device),
        response_mask=part.response_mask(width).to(device),
        per_token=per_token,
        replay_routing=part.replay_routing,
    )
