"""The embedded server's /pause_generation, /continue_generation and /abort_request, as SGLang 0.5.23 treats
requests in flight (``tokenizer_manager.py``, ``scheduler.py``), and its ``meta_info.weight_versions`` spans
(``utils/weight_versions.py``). The model worker is driven in-process so that "mid-generation" is exact; the HTTP
gate is checked over loopback. ~10 s."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from http_json import post_json, trust

from megatron_sapo.rollout.decode import DecodeRequest, decode_batch
from megatron_sapo.rollout.server import ABORTED, ABORTED_WAITING, Live, ModelWorker, load_model, weight_version_spans

LONG = dict(max_new_tokens=200, temperature=1.0, ignore_eos=True, seed=3)


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir)[0]


def _worker(model) -> ModelWorker:
    return ModelWorker(model, eos_token_ids=frozenset({5}), pad_token_id=0, max_positions=512)


def _wait_for_tokens(live: Live, count: int) -> None:
    deadline = time.monotonic() + 60
    while live.result is None or len(live.result.output_ids) < count:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_in_place_pause_holds_requests_while_weights_change_then_they_go_on(model):
    worker = _worker(model)
    prompt = [1, 7, 8, 9]
    reference = decode_batch(model, [DecodeRequest(prompt, **LONG)], eos_token_ids=frozenset({5}))[0]
    live = Live("r1")
    future = worker.generate([DecodeRequest(prompt, **LONG)], [live])
    _wait_for_tokens(live, 5)
    worker.set_paused(True)
    held = len(live.result.output_ids)
    # While paused a weight update (an admin job) runs; the held request makes no token meanwhile.
    assert worker.call(lambda: len(live.result.output_ids)).result(timeout=30) == held
    time.sleep(0.2)
    assert len(live.result.output_ids) == held and not future.done()
    queued = worker.generate([DecodeRequest(prompt, **{**LONG, "max_new_tokens": 3})])
    time.sleep(0.1)
    assert not queued.done()  # queued generation does not start while paused
    worker.set_paused(False)
    result = future.result(timeout=60)[0]
    assert queued.result(timeout=60)[0].finish_reason == {"type": "length", "length": 3}
    # Same weights throughout here, so the paused request ends exactly as one never paused.
    assert result.output_ids == reference.output_ids and result.finish_reason == reference.finish_reason


def test_abort_ends_a_running_request_with_its_partial_output_and_a_queued_one_empty(model):
    worker = _worker(model)
    running, queued = Live("a-1"), Live("b-1")
    future = worker.generate([DecodeRequest([1, 7, 8], **LONG)], [running])
    _wait_for_tokens(running, 4)
    worker.set_paused(True)  # hold it, so that the queued request is still queued when both are aborted
    later = worker.generate([DecodeRequest([1, 9], **LONG)], [queued])
    running.abort, queued.abort = ABORTED, ABORTED
    worker.set_paused(False)
    result = future.result(timeout=60)[0]
    assert result.finish_reason == {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    assert 4 <= len(result.output_ids) < LONG["max_new_tokens"] and len(result.logprobs) == len(result.output_ids)
    empty = later.result(timeout=60)[0]
    assert empty.finish_reason == ABORTED_WAITING and empty.output_ids == []


def test_weight_version_spans_follow_sglang():
    # compute_weight_version_spans: a request that made 3 tokens on v1, was held while v2 and then v3 arrived
    # (v2 made nothing), and finished on v3 with 7 tokens in all.
    assert weight_version_spans([("1", 3), ("2", 3)], "3", 7) == [
        {"version": "1", "start": 0, "end": 3}, {"version": "3", "start": 3, "end": 7},
    ]  # fmt: skip
    assert weight_version_spans([], "5", 4) == [{"version": "5", "start": 0, "end": 4}]
    assert weight_version_spans([("1", 2)], "1", 6) == [{"version": "1", "start": 0, "end": 6}]
    assert weight_version_spans([], "2", 0) == [{"version": "2", "start": 0, "end": 0}]


def test_http_pause_holds_new_requests_until_continue_and_abort_by_rid(tiny_hf_dir):
    from megatron_sapo.rollout import RolloutConfig, RolloutEngine

    config = RolloutConfig(backend="embedded", n=1, max_new_tokens=8)
    with RolloutEngine(config, model_path=tiny_hf_dir, eos_token_id=5) as engine:
        url = trust(engine).urls[0]
        assert post_json(url, "/pause_generation", {"mode": "in_place"}) == (
            200, {"message": "Generation paused successfully.", "status": "ok"},
        )  # fmt: skip
        replies = []
        body = {"input_ids": [1, 7, 8], "rid": "held", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
        thread = threading.Thread(target=lambda: replies.append(post_json(url, "/generate", body)))
        thread.start()
        time.sleep(0.5)
        assert not replies  # waits at the gate, as SGLang's is_pause_cond
        assert post_json(url, "/abort_request", {"rid": "held"}) == (200, None)  # not admitted yet: nothing to abort
        assert post_json(url, "/continue_generation", {}) == (
            200, {"message": "Generation continued successfully.", "status": "ok"},
        )  # fmt: skip
        thread.join(60)
        status, reply = replies[0]
        meta = reply["meta_info"]
        assert status == 200 and meta["id"] == "held" and meta["finish_reason"]["type"] == "length"
        assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 4}]
        assert meta["weight_version"] == "default"
        # Nothing in flight: a pause in abort mode returns at once.
        assert post_json(url, "/pause_generation", {})[0] == 200
        assert post_json(url, "/continue_generation", {})[0] == 200
        assert torch.tensor(len(reply["output_ids"])) == 4
