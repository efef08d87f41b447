"""Over-sampling with abort (``rollout.over_sample_factor``) against the embedded server over real HTTP: the first
``keep`` complete groups come back, whole and identical to the groups a plain call gives for those prompts, and
the rest are really aborted on the server, which stays usable. ~15 s."""

from __future__ import annotations

import pytest

from megatron_sapo.errors import InputError
from megatron_sapo.rollout import RolloutConfig, RolloutEngine

# Six prompts, two samples each: 12 requests, decoded 4 at a time, so most are queued or running when the first
# two groups complete.
PROMPTS = [[1, 7, 8, 9], [1, 20, 21], [1, 30, 31, 32], [1, 40, 41], [1, 50, 51, 52], [1, 60, 61]]
N, KEEP, LONG = 2, 2, 160


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    config = RolloutConfig(backend="embedded", n=N, max_new_tokens=LONG, embedded_max_batch_size=4)
    with RolloutEngine(config, model_path=tiny_hf_dir, eos_token_id=5) as engine:
        yield engine


def _ids(groups):
    return [[s.response_ids for s in g] for g in groups]


def test_over_sampling_keeps_whole_groups_and_aborts_the_rest(engine):
    plain = engine.generate(PROMPTS, n=N, seed=5)  # every group awaited: the reference
    before = engine.client.aborted_requests
    kept, groups = engine.generate_first(PROMPTS, KEEP, n=N, seed=5)
    assert len(kept) == len(groups) == KEEP and len(set(kept)) == KEEP
    for index, group in zip(kept, groups, strict=True):
        assert len(group) == N and all(s.finish_reason in ("stop", "length") for s in group)
        assert all(s.prompt_ids == PROMPTS[index] for s in group)
        # Same per-(prompt, sample) seeds: a kept group is exactly the group the plain call gave that prompt.
        assert _ids([group]) == _ids([plain[index]])
        for a, b in zip(group, plain[index], strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5
    # The outstanding requests reached the server's /abort_request and answered with finish_reason abort.
    aborted = engine.client.aborted_requests - before
    assert 0 < aborted <= (len(PROMPTS) - KEEP) * N
    # The server is still usable, and unchanged: the same seeded call gives the same tokens.
    assert _ids(engine.generate(PROMPTS[:2], n=N, seed=5)) == _ids(plain[:2])


def test_keeping_every_group_is_the_plain_call(engine):
    """With nothing to discard (factor 1.0 draws exactly the prompts needed), the result is the plain call's."""
    plain = engine.generate(PROMPTS[:3], n=N, seed=3, max_new_tokens=12)
    kept, groups = engine.generate_first(PROMPTS[:3], 3, n=N, seed=3, max_new_tokens=12)
    assert sorted(kept) == [0, 1, 2]
    assert _ids(groups) == _ids([plain[i] for i in kept])


def test_over_sample_factor_below_one_is_one_error_line():
    with pytest.raises(InputError, match=r"^rollout\.over_sample_factor=0\.5: must be >= 1\.0") as error:
        RolloutConfig(over_sample_factor=0.5)
    assert "\n" not in str(error.value)


class _Stream:
    def __init__(self):
        self.drawn = []

    def next_batch(self, count):
        from types import SimpleNamespace

        start = len(self.drawn)
        batch = [SimpleNamespace(prompt_ids=[1, 10 + i], label="", data_source="t", extra_info={})
                 for i in range(start, start + count)]  # fmt: skip
        self.drawn += batch
        return batch

    def state_dict(self):
        return {"drawn": len(self.drawn)}


def test_trainer_draws_ceil_factor_prompts_and_counts_the_discarded_groups(engine, tiny_hf_dir):
    from types import SimpleNamespace

    from megatron_sapo.config import Config
    from megatron_sapo.models import load_arch
    from megatron_sapo.trainer import _generate_batch

    rewards = SimpleNamespace(compute_rewards=lambda samples: ([float(len(s.response) % 2) for s in samples],
                                                               {"num_errors": 0, "num_timeouts": 0}))  # fmt: skip
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "x" * len(ids))
    arch, results = load_arch(tiny_hf_dir), {}
    for factor in (1.0, 2.5):
        config = Config()
        config.rollout.n, config.rollout.over_sample_factor = N, factor
        config.data.train_batch_size, config.data.max_response_length = 2, 24
        stream, metrics = _Stream(), {}
        batch = _generate_batch(config, arch, stream, engine, rewards, tokenizer, 1, metrics)
        assert len(batch["scores"]) == 2 * N and batch["group_index"] == [0] * N + [1] * N
        results[factor] = (len(stream.drawn), metrics.get("rollout/aborted_groups"), batch)
    # 1.0: two prompts drawn, no abort metric, today's path; 2.5: ceil(2.5 × 2) = 5 drawn, 3 discarded.
    assert results[1.0][:2] == (2, None)
    assert results[2.5][:2] == (5, 3.0)
    # Factor 1.0 is today's batch: the plain seeded call on the two prompts drawn; 2.5 keeps groups of that same call.
    from megatron_sapo.trainer import _round_seed

    drawn = [[1, 10 + i] for i in range(5)]
    plain = engine.generate(drawn, n=N, seed=_round_seed(Config().trainer.seed, 1, 0), max_new_tokens=24)
    plain_rows = {tuple(s.response_ids) for g in plain for s in g}
    assert results[1.0][2]["samples"].response_ids == [s.response_ids for g in plain[:2] for s in g]
    assert {tuple(r) for r in results[2.5][2]["samples"].response_ids} <= plain_rows
