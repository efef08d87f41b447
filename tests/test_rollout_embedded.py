"""Client ↔ embedded server over real HTTP on loopback: n samples per prompt, stop tokens, max_new_tokens, seeds,
and log-probs checked against transformers recomputing them from scratch."""

from __future__ import annotations

import time
import urllib.request

import pytest
import torch
from http_json import get_json, post_json, trust

from megatron_sapo.rollout import RolloutConfig, RolloutEngine, RolloutError, SamplingParams
from megatron_sapo.rollout.client import sample_seed

PROMPTS = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    config = RolloutConfig(backend="embedded", n=4, max_new_tokens=16, max_retries=3, retry_backoff_s=1.0)
    with RolloutEngine(config, model_path=tiny_hf_dir, eos_token_id=5) as engine:
        yield trust(engine)


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


@torch.no_grad()
def recomputed_logprobs(model, prompt, response, temperature):
    """log softmax(logits / T) of each response token, from one full forward pass (no cache, no padding)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / scale, -1).gather(-1, torch.tensor(response)[:, None])[:, 0], logits


def test_n_samples_per_prompt(engine):
    groups = engine.generate(PROMPTS, n=4, seed=7, max_new_tokens=12)
    assert [len(g) for g in groups] == [4, 4, 4]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for sample in group:
            assert sample.prompt_ids == prompt
            assert 1 <= len(sample.response_ids) <= 12 and len(sample.logprobs) == len(sample.response_ids)
            assert all(lp <= 0 for lp in sample.logprobs)
            if sample.finish_reason == "stop":
                assert sample.response_ids[-1] == sample.matched_stop == 5
            else:
                assert sample.finish_reason == "length" and len(sample.response_ids) == 12
        # Four samples at temperature 1 from a 250-token vocabulary: distinct draws, not copies of one.
        assert len({tuple(s.response_ids) for s in group}) == 4


def test_seeds_reproduce_the_same_tokens_whatever_the_batch(engine):
    first = engine.generate(PROMPTS, n=3, seed=11)
    again = engine.generate(PROMPTS, n=3, seed=11)
    alone = engine.generate(PROMPTS[:1], n=3, seed=11)  # prompt 0 alone: same per-sample seeds, other batch
    other = engine.generate(PROMPTS, n=3, seed=12)
    ids = lambda groups: [[s.response_ids for s in g] for g in groups]  # noqa: E731
    assert ids(first) == ids(again) and ids(alone)[0] == ids(first)[0]
    assert ids(other) != ids(first)
    for a, b in zip(first[0], alone[0], strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5

    # The server side of it: one seeded row decoded alone, then inside a batch of other prompts.
    seeded = {"temperature": 1.0, "max_new_tokens": 10, "sampling_seed": 1234, "ignore_eos": True}
    unseeded = {"temperature": 1.0, "max_new_tokens": 14, "ignore_eos": True}
    _, single = post_json(engine.urls[0], "/generate", {"input_ids": PROMPTS[1], "sampling_params": seeded})
    _, batch = post_json(engine.urls[0], "/generate", {"input_ids": [PROMPTS[0], PROMPTS[1], PROMPTS[2]],
                                                  "sampling_params": [unseeded, seeded, unseeded]})  # fmt: skip
    assert single["output_ids"] == batch[1]["output_ids"] and len(single["output_ids"]) == 10


def test_max_new_tokens(engine):
    exact = engine.generate(PROMPTS, n=2, seed=3, sampling=engine.sampling_params(max_new_tokens=5, ignore_eos=True,
                                                                                  stop_token_ids=()))  # fmt: skip
    assert all(len(s.response_ids) == 5 and s.finish_reason == "length" for g in exact for s in g)
    capped = engine.generate(PROMPTS, n=2, seed=3, max_new_tokens=3)
    assert all(len(s.response_ids) <= 3 for g in capped for s in g)
    # Same seed, shorter limit: the same first tokens.
    assert [s.response_ids[:3] for g in exact for s in g][0] == capped[0][0].response_ids[:3]


def test_stop_tokens_end_the_response_after_the_first_match(engine):
    greedy = engine.sampling_params(temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=())
    (baseline,) = engine.generate(PROMPTS[:1], n=1, sampling=greedy)[0]
    assert len(baseline.response_ids) == 12
    stop = baseline.response_ids[4]
    first = baseline.response_ids.index(stop)
    (stopped,) = engine.generate(PROMPTS[:1], n=1, sampling=engine.sampling_params(
        temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=(stop,)))[0]  # fmt: skip
    assert stopped.response_ids == baseline.response_ids[: first + 1]
    assert (stopped.finish_reason, stopped.matched_stop) == ("stop", stop)
    assert stopped.logprobs == pytest.approx(baseline.logprobs[: first + 1], abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_logprobs_equal_transformers_recomputed(engine, hf_model, temperature):
    sampling = engine.sampling_params(temperature=temperature, max_new_tokens=16)
    groups = engine.generate(PROMPTS, n=2, seed=21, sampling=sampling)
    worst = 0.0
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for sample in group:
            reference, logits = recomputed_logprobs(hf_model, prompt, sample.response_ids, temperature)
            worst = max(worst, (torch.tensor(sample.logprobs) - reference).abs().max().item())
            if temperature == 0.0:  # greedy: every token is the argmax of the recomputed logits
                assert sample.response_ids == logits.argmax(-1).tolist()
    assert worst < 1e-5, worst


def test_greedy_matches_transformers_generate(engine, hf_model):
    (sample,) = engine.generate(PROMPTS[2:], n=1, sampling=engine.sampling_params(temperature=0.0, max_new_tokens=10,
                                                                                   ignore_eos=True))[0]  # fmt: skip
    reference = hf_model.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=3)  # fmt: skip
    assert sample.response_ids == reference[0, len(PROMPTS[2]) :].tolist()


@torch.no_grad()
def test_sampling_follows_the_tempered_distribution(engine, hf_model):
    prompt, count = PROMPTS[0], 400
    logits = hf_model(input_ids=torch.tensor([prompt])).logits[0, -1].float()

    # At T=0.2 the tiny model's next-token distribution is peaked (entropy 3.7 nats of log 250 = 5.5), so the
    # temperature shows: E[log p_T(token)] = -H(p_T) = -3.74 if tokens are drawn from p_T, but -5.5 if they were
    # drawn at T=0.4, and -6.7 at T=1. The mean reported log-prob of 400 draws must land within 4 standard errors.
    temperature = 0.2
    logp = torch.log_softmax(logits / temperature, -1)
    entropy = -(logp.exp() * logp).sum().item()
    sampling = engine.sampling_params(temperature=temperature, max_new_tokens=1, ignore_eos=True)
    draws = [g[0] for g in engine.generate([prompt] * count, n=1, seed=99, sampling=sampling)]
    tokens = torch.tensor([d.response_ids[0] for d in draws])
    reported = torch.tensor([d.logprobs[0] for d in draws])
    assert torch.allclose(reported, logp[tokens], atol=1e-5)
    stderr = reported.std().item() / count**0.5
    assert abs(reported.mean().item() + entropy) < 4 * stderr, (reported.mean().item(), -entropy, stderr)

    # top-k and top-p restrict the support (checked at T=1.5, where many tokens are likely).
    temperature = 1.5
    top_k = torch.topk(logits, 5).indices.tolist()
    sampling = engine.sampling_params(temperature=temperature, top_k=5, max_new_tokens=1, ignore_eos=True)
    seen = {g[0].response_ids[0] for g in engine.generate([prompt] * 60, n=1, seed=5, sampling=sampling)}
    assert seen <= set(top_k) and len(seen) > 1

    probs, order = torch.softmax(logits / temperature, -1).sort(descending=True)
    nucleus = set(order[(probs.cumsum(0) - probs) <= 0.2].tolist())
    sampling = engine.sampling_params(temperature=temperature, top_p=0.2, max_new_tokens=1, ignore_eos=True)
    seen = {g[0].response_ids[0] for g in engine.generate([prompt] * 60, n=1, seed=6, sampling=sampling)}
    assert seen <= nucleus and len(seen) > 1, (seen, nucleus)


def test_replies_have_sglangs_shape(engine):
    status, reply = post_json(
        engine.urls[0],
        "/generate",
        {"input_ids": PROMPTS[0], "return_logprob": True, "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
    )
    assert status == 200 and set(reply) == {"text", "output_ids", "meta_info"} and isinstance(reply["text"], str)
    meta = reply["meta_info"]
    assert meta["prompt_tokens"] == len(PROMPTS[0]) and meta["completion_tokens"] == len(reply["output_ids"])
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert [t for _, t, _ in meta["output_token_logprobs"]] == reply["output_ids"]
    assert all(isinstance(lp, float) and text is None for lp, _, text in meta["output_token_logprobs"])

    # A batch with n=2 is the batch twice over (SGLang: input_ids * n), one reply per row.
    status, replies = post_json(
        engine.urls[0],
        "/generate",
        {"input_ids": [PROMPTS[0], PROMPTS[1]], "sampling_params": {"max_new_tokens": 2, "n": 2}},
    )
    assert status == 200 and [r["meta_info"]["prompt_tokens"] for r in replies] == [6, 3, 6, 3]
    assert all("output_token_logprobs" not in r["meta_info"] for r in replies)  # not asked for


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": []}, "input_ids cannot be empty"),
        ({"text": "hello"}, "send input_ids"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, r"top_p must be in \(0, 1\]"),
        ({"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}}, "not supported"),
        ({"input_ids": [1, 2], "sampling_params": {"temprature": 1}}, "unknown field `temprature`"),
        ({"input_ids": [1, 999]}, r"token ids in \[0, 250\)"),
        ({"input_ids": [1] * 600}, "longer than the model's context length"),
    ],
)
def test_bad_requests_get_sglangs_400(engine, body, message):
    """SGLang 0.5.23's shapes: the schema check answers {"error": text}, a ValueError {"error": {"message": text}}."""
    status, reply = post_json(engine.urls[0], "/generate", body)
    assert status == 400 and set(reply) == {"error"}
    text = reply["error"] if "unknown field" in message else reply["error"]["message"]
    assert __import__("re").search(message, text), text


def test_a_bad_request_fails_at_once_without_retries(engine):
    start = time.monotonic()
    with pytest.raises(RolloutError, match=r"HTTP 400: input_ids must be token ids"):
        engine.generate([[1, 10_000]], n=1)
    assert time.monotonic() - start < 1.0  # max_retries=3 with 1 s backoff would take 7 s


def test_health_info_flush_and_memory_release(engine):
    url = engine.urls[0]
    for path in ("/health", "/health_generate"):
        assert urllib.request.urlopen(url + path, timeout=30).status == 200
    for path in ("/model_info", "/get_model_info"):  # the second is 0.5.23's deprecated name
        info = get_json(url, path)
        assert info["is_generation"] is True and info["model_path"].endswith(engine.model_path.rstrip("/"))
    info = get_json(url, "/server_info")
    assert (info["tp_size"], info["dp_size"], info["pp_size"]) == (1, 1, 1)
    engine.flush_cache()

    # SGLang 0.5.23: no tags = all three; the trainer takes the weights back first, then the KV cache and graphs.
    engine.release_memory()
    try:
        with pytest.raises(RolloutError, match=r"memory released \(cuda_graph, kv_cache, weights\)"):
            engine.generate(PROMPTS[:1], n=1)
        engine.resume_memory(["weights"])
        with pytest.raises(RolloutError, match=r"memory released \(cuda_graph, kv_cache\)"):
            engine.generate(PROMPTS[:1], n=1)
        with pytest.raises(RolloutError, match=r"memory tag\(s\) \['weights'\] not released"):
            engine.resume_memory(["weights"])  # a second resume fails in SGLang too (offload_tags.remove)
        with pytest.raises(RolloutError, match=r"\['kv_cache'\] already released"):
            engine.release_memory(["kv_cache"])
    finally:
        engine.resume_memory(["kv_cache", "cuda_graph"])
    assert len(engine.generate(PROMPTS[:1], n=1, max_new_tokens=2)[0]) == 1
    with pytest.raises(RolloutError, match=r"not released"):
        engine.resume_memory()  # nothing is released: resuming all three fails


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(s, p, j) for s in range(4) for p in range(64) for j in range(16)}
    assert len(seeds) == 4 * 64 * 16 and all(0 <= x < 2**31 for x in seeds)


def test_generate_seed_defaults_to_the_sampling_seed(engine):
    by_call = engine.generate(PROMPTS[:2], n=2, seed=8)
    by_params = engine.generate(PROMPTS[:2], n=2, sampling=engine.sampling_params(seed=8))
    assert [[s.response_ids for s in g] for g in by_call] == [[s.response_ids for s in g] for g in by_params]


def test_sampling_params_default_from_config(engine):
    params = engine.sampling_params()
    assert params == SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=16, stop_token_ids=(5,))
