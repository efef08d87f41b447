"""The rollout side of routing replay: the embedded server's meta_info.routed_experts equals transformers' own
top-k of the same tokens, in SGLang 0.5.23's format and position range; the launcher flag and request fields are
SGLang's. (~10 s)"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from http_json import post_json, trust

from megatron_sapo.models.routing_replay import decode_routed_experts
from megatron_sapo.rollout import RolloutConfig, RolloutEngine
from megatron_sapo.rollout.client import generate_payload
from megatron_sapo.rollout.sglang import sglang_command

PROMPTS = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
SGLANG_SRC = "/tmp/sglang/src/sglang/srt"


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    config = RolloutConfig(backend="embedded", n=2, max_new_tokens=9, enable_return_routed_experts=True)
    with trust(RolloutEngine(config, model_path=tiny_hf_dir, eos_token_id=5)) as engine:
        yield engine


@torch.no_grad()
def transformers_topk(hf_dir, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), layers, top_k]``: each gate's top-k in one full forward (no cache, no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    layers = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda module, args, output: layers.append(output[2]))
    model(input_ids=torch.tensor([tokens]))
    return torch.stack(layers, dim=1)


def test_routing_equals_transformers_topk_over_seq_len_minus_one(engine, tiny_hf_dir):
    groups = engine.generate(PROMPTS, n=2, seed=3)
    compared = 0
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            routing = decode_routed_experts(sample.meta_info["routed_experts"], 4, 2)
            tokens = prompt + sample.response_ids
            # SGLang: positions [0, seq_len - 1), i.e. every token fed through the model.
            assert routing.shape == (len(tokens) - 1, 4, 2)
            reference = transformers_topk(tiny_hf_dir, tokens[:-1])
            assert torch.equal(routing.sort(-1).values, reference.sort(-1).values.to(routing.dtype))
            compared += 1
    assert compared == 6


def test_start_len_and_bad_requests(engine, tiny_hf_dir):
    url = engine.urls[0]
    body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0},
            "return_routed_experts": True, "routed_experts_start_len": 3}  # fmt: skip
    status, reply = post_json(url, "/generate", body)
    assert status == 200
    routing = decode_routed_experts(reply["meta_info"]["routed_experts"], 4, 2)
    full = len(PROMPTS[0]) + len(reply["output_ids"]) - 1
    assert routing.shape[0] == full - 3
    status, reply = post_json(url, "/generate", {**body, "routed_experts_start_len": len(PROMPTS[0]) + 1})
    assert status == 400 and "routed_experts_start_len" in json.dumps(reply)
    status, reply = post_json(url, "/generate", {k: v for k, v in body.items() if k != "return_routed_experts"})
    assert status == 200 and "routed_experts" not in reply["meta_info"]


def test_launcher_flag_and_request_fields():
    on = RolloutConfig(backend="sglang", enable_return_routed_experts=True)
    assert "--enable-return-routed-experts" in sglang_command(on, "/ckpt", port=1)
    assert "--enable-return-routed-experts" not in sglang_command(RolloutConfig(backend="sglang"), "/ckpt", port=1)
    from megatron_sapo.rollout.client import SamplingParams

    payload = generate_payload([1, 2], SamplingParams(return_routed_experts=True))
    assert payload["return_routed_experts"] is True and payload["routed_experts_start_len"] == 0
    assert "return_routed_experts" not in generate_payload([1, 2], SamplingParams())


@pytest.mark.skipif(not os.path.isdir(SGLANG_SRC), reason="the sglang 0.5.23 wheel is not unpacked")
def test_names_match_the_sglang_release():
    with open(os.path.join(SGLANG_SRC, "arg_groups/fields/exec_.py")) as f:
        assert re.search(r"^\s+enable_return_routed_experts: A\[", f.read(), re.M)  # --enable-return-routed-experts
    with open(os.path.join(SGLANG_SRC, "managers/io_struct.py")) as f:
        source = f.read()
    assert "return_routed_experts: bool = False" in source and "routed_experts_start_len: int = 0" in source
    with open(os.path.join(SGLANG_SRC, "state_capturer/base.py")) as f:
        assert "[start_len : seqlen - 1]" in f.read()
