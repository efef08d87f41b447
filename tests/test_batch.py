"""Data-parallel sharding and length bucketing of training samples."""

import random

import torch

from megatron_sapo.batch import (
    Samples,
    bucket_by_length,
    data_parallel_shard,
    make_micro_batch,
    response_aligned,
    split_to_count,
)


def test_data_parallel_shards_partition_the_batch_and_balance_tokens():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(64)]
    shards = [data_parallel_shard(lengths, 4, r) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(64))
    assert {len(s) for s in shards} == {16}
    tokens = [sum(lengths[i] for i in s) for s in shards]
    assert max(tokens) - min(tokens) <= max(lengths)  # snake dealing bounds the imbalance by one sample


def test_buckets_respect_the_token_budget_with_padding():
    lengths = [100, 7, 50, 33, 98, 12, 64, 64, 3]
    buckets = bucket_by_length(lengths, max_tokens=200, pad_multiple=8)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        longest = -(-max(lengths[i] for i in bucket) // 8) * 8
        assert longest * len(bucket) <= 200 or len(bucket) == 1
    # Longest first: 100 and 98 pad to 104 and 104, two of them (208) exceed the budget; three 64s fit (192).
    assert buckets == [[0], [4], [6, 7, 2], [3, 5, 1, 8]]


def test_split_to_count_keeps_every_sample_and_reaches_the_count():
    lengths = [10] * 9
    buckets = split_to_count([[0, 1, 2, 3, 4, 5, 6, 7, 8]], lengths, 4)
    assert len(buckets) == 4 and sorted(i for b in buckets for i in b) == list(range(9))


def test_micro_batch_indexes_the_logits_that_predict_each_response_token():
    samples = Samples(prompt_ids=[[1, 2, 3], [4]], response_ids=[[5, 6], [7, 8, 9]])
    samples.advantages = response_aligned([[1.0, 1.0], [-1.0, -1.0, -1.0]], samples.max_response_len)
    mb = make_micro_batch(samples, [0, 1], pad_multiple=4, device="cpu")
    assert mb.tokens.tolist() == [[1, 2, 3, 5, 6, 0, 0, 0], [4, 7, 8, 9, 0, 0, 0, 0]]
    # target at position p is token p + 1; response token j of sample i is predicted at prompt_len - 1 + j
    assert torch.equal(mb.targets.gather(1, mb.response_index) * mb.response_mask.long(),
                       torch.tensor([[5, 6, 0], [7, 8, 9]]))  # fmt: skip
    assert mb.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert mb.per_token["advantages"].tolist() == [[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]
