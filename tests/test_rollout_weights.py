"""Weight updates: after an update (from disk, broadcast from 2 trainer ranks, or handed over as tensor handles by
colocated trainer ranks) a server generates exactly what a fresh server loaded with the new weights generates; and
the server holds the trainer to SGLang 0.5.23's order (weight-update sessions, memory tags)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from http_json import post_json, trust
from torchrun import torchrun

from megatron_sapo.errors import InputError
from megatron_sapo.rollout import RolloutConfig, RolloutEngine, RolloutError
from megatron_sapo.rollout.hf_weights import HFWeightWriter, iter_safetensors, safetensors_files
from megatron_sapo.rollout.process import http_status
from megatron_sapo.rollout.weight_sync import iter_buckets

PROMPTS = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]]
BUCKET_MB = 64 / 1024  # 64 KiB: the tiny model's 0.8 MB go in ~15 buckets


def perturbed_copy(hf_dir: str, out: str) -> str:
    """``hf_dir`` with every weight moved by N(0, 0.05²): saved by transformers (hub names; a tied model's
    embedding moves its output layer too, and no lm_head.weight is written)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(2024)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    for name in ("tokenizer.model", "generation_config.json"):
        shutil.copy(os.path.join(hf_dir, name), os.path.join(out, name))
    return out


@pytest.fixture(scope="module")
def perturbed_dir(tiny_hf_dir, tmp_path_factory):
    return perturbed_copy(tiny_hf_dir, str(tmp_path_factory.mktemp("tiny_perturbed")))


def start(model_path: str, **fields) -> RolloutEngine:
    config = RolloutConfig(backend="embedded", max_new_tokens=12, bucket_size_mb=BUCKET_MB, **fields)
    return trust(RolloutEngine(config, model_path=model_path, eos_token_id=5))


@pytest.fixture(scope="module")
def server(tiny_hf_dir):
    """The server under update; it starts from the original weights."""
    with start(tiny_hf_dir, weight_sync="disk") as engine:
        yield engine


@pytest.fixture(scope="module")
def baseline(server):
    """What a server with the original weights generates (taken before any update)."""
    return generations(server)


@pytest.fixture(scope="module")
def fresh(perturbed_dir):
    """What a fresh server loaded with the perturbed checkpoint generates."""
    with start(perturbed_dir) as engine:
        yield generations(engine)


def generations(engine: RolloutEngine):
    greedy = engine.generate(PROMPTS, n=1, sampling=engine.sampling_params(temperature=0.0, ignore_eos=True))
    seeded = engine.generate(PROMPTS, n=3, seed=5, sampling=engine.sampling_params(temperature=1.0))
    return [s for group in greedy + seeded for s in group]


def assert_same_generations(got, want):
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    worst = max(max((abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True)), default=0.0)
                for g, w in zip(got, want, strict=True))  # fmt: skip
    assert worst <= 1e-5, worst


# --- name mapping and buckets (no server) ----------------------------------------------------------------------


def test_hub_names_load_like_transformers_does(tiny_hf_dir):
    """Writing the checkpoint's per-expert tensors one by one into a random model gives exactly the model
    transformers' own loader builds (which fuses experts into gate_up_proj/down_proj)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_hf_dir), dtype=torch.float32)
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())  # fused in memory
    names = [name for name, _ in iter_safetensors(tiny_hf_dir)]
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in names  # one tensor per expert on disk
    writer = HFWeightWriter(model)
    for name, tensor in iter_safetensors(tiny_hf_dir):  # one at a time, as buckets arrive
        assert writer.write([(name, tensor)]) == 1
    want, got = reference.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_a_bucket_with_part_of_the_experts_touches_only_their_slices(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    before = fused.detach().clone()
    intermediate = before.shape[1] // 2
    up = torch.full((intermediate, before.shape[2]), 7.0)
    HFWeightWriter(model).write([("model.layers.1.mlp.experts.2.up_proj.weight", up)])
    changed = (fused.detach() != before).nonzero()
    assert set(changed[:, 0].tolist()) == {2} and changed[:, 1].min().item() == intermediate
    assert torch.equal(fused.detach()[2, intermediate:], up)

    writer = HFWeightWriter(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no such weight"):
        writer.write([("model.norm.weight", torch.zeros(64)), ("model.layers.0.mlp.unknown.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"shape \[3\] does not fit the model's \[64\]"):
        writer.write([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="expert 9 out of range"):
        writer.write([("model.layers.0.mlp.experts.9.down_proj.weight", torch.zeros(64, 32))])
    # Checked before anything is written: the good tensor of the refused bucket did not land.
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_buckets_are_bounded_and_keep_order():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1, 1])]  # float32: 4 B each
    buckets = list(iter_buckets(iter(tensors), bucket_bytes=80))
    assert [[name for name, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5", "t6"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 80 for b in buckets if len(b) > 1)  # one oversized alone
    assert [name for b in buckets for name, _ in b] == [name for name, _ in tensors]


# --- updates on a running server ---------------------------------------------------------------------------------


def test_update_from_disk_generates_like_a_fresh_server(server, baseline, fresh, perturbed_dir):
    assert [s.response_ids for s in fresh] != [s.response_ids for s in baseline]  # the perturbation shows
    stats = server.update_weights(iter_safetensors(perturbed_dir), weight_version="disk-1")
    assert (
        stats.tensors == 87
        and stats.buckets >= 10
        and stats.bytes == sum(t.numel() * t.element_size() for _, t in iter_safetensors(perturbed_dir))
    )
    written = server._sync.folder
    assert len(safetensors_files(written)) == stats.buckets
    got = generations(server)
    assert_same_generations(got, fresh)
    assert {s.weight_version for s in got} == {"disk-1"}


def test_update_broadcast_from_two_trainer_ranks_generates_like_a_fresh_server(server, baseline, fresh, tiny_hf_dir,
                                                                               perturbed_dir):  # fmt: skip
    server.update_weights(iter_safetensors(tiny_hf_dir))  # back to the original weights, from disk
    assert_same_generations(generations(server), baseline)

    result = torchrun("rollout_weight_sync.py", "--url", server.urls[0], "--api-key", server.api_key,
                      "--hf-dir", perturbed_dir,
                      "--bucket-kb", "64", nproc=2, timeout=300)  # fmt: skip
    assert result["world_size"] == 2 and result["ranks_per_server"] == [1]
    assert result["default_group_sums"] == [3.0, 3.0]
    for push in result["pushes"]:
        assert push["tensors"] == 87 and push["buckets"] >= 10
    got = generations(server)
    assert_same_generations(got, fresh)
    assert {s.weight_version for s in got} == {"torchrun-1"}


def test_a_trainer_under_torchrun_starts_its_embedded_server_and_broadcasts_to_it(fresh, tiny_hf_dir, perturbed_dir):
    """The trainer's own path: rank 0 of a torchrun job starts the embedded server, which must not mistake
    itself for a torchrun worker, and the group forms despite torchrun's agent store."""
    result = torchrun("rollout_weight_sync.py", "--start-from", tiny_hf_dir, "--hf-dir", perturbed_dir,
                      "--bucket-kb", "64", nproc=2, timeout=300)  # fmt: skip
    assert [p["buckets"] >= 10 for p in result["pushes"]] == [True, True]
    assert result["mode"] == "distributed"  # the embedded server has one rank, the trainer two: a gloo broadcast
    assert_same_generations_json(result["generations"], fresh)


def assert_same_generations_json(got, want):
    assert [ids for ids, _, _ in got] == [s.response_ids for s in want]
    worst = max(
        max(abs(a - b) for a, b in zip(lps, s.logprobs, strict=True)) for (_, lps, _), s in zip(got, want, strict=True)
    )
    assert worst <= 1e-5, worst


def test_colocated_trainer_ranks_hand_their_server_ranks_tensor_handles(fresh, tiny_hf_dir, perturbed_dir):
    """weight_sync=auto on 2 trainer ranks with the embedded server standing in for a TP-2 server: tensor handles
    (shared-memory files on CPU), each rank's to its own server rank. First push: rank 0 hands the perturbed
    checkpoint, rank 1 the original, so server rank r's rows (shard r of every tensor) come from rank r's payload,
    which transformers, given those mixed weights, confirms; second push: both perturbed, as a fresh server."""
    from transformers import AutoModelForCausalLM

    result = torchrun("rollout_weight_sync.py", "--mode", "tensor", "--start-from", tiny_hf_dir, "--hf-dir",
                      perturbed_dir, "--rank1-first", tiny_hf_dir, "--bucket-kb", "64", nproc=2,
                      timeout=300)  # fmt: skip
    assert result["mode"] == "tensor" and result["ranks_per_server"] == [2]
    assert [p["tensors"] for p in result["pushes"]] == [87, 87] and min(p["buckets"] for p in result["pushes"]) >= 10
    assert result["default_group_sums"] == [3.0, 3.0]

    original, perturbed = dict(iter_safetensors(tiny_hf_dir)), dict(iter_safetensors(perturbed_dir))
    mixed = [(name, torch.cat([perturbed[name].tensor_split(2)[0], original[name].tensor_split(2)[1]]))
             for name in original]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    HFWeightWriter(model).write(mixed)
    want = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=3)[0, len(p) :].tolist() for p in PROMPTS]  # fmt: skip
    assert result["first_greedy"] == want
    assert want != [s.response_ids for s in fresh[:3]]  # neither checkpoint alone

    assert_same_generations_json(result["generations"], fresh)
    assert {v for _, _, v in result["generations"]} == {"torchrun-1"}


def test_tensor_update_in_one_process_generates_like_a_fresh_server(server, fresh, tiny_hf_dir, perturbed_dir):
    """A one-process trainer colocated with a TP-1 server (weight_sync=tensor, external): the same generations."""
    config = RolloutConfig(backend="external", urls=server.urls, api_key=server.api_key, weight_sync="tensor",
                           bucket_size_mb=BUCKET_MB)  # fmt: skip
    with RolloutEngine(config, model_path=tiny_hf_dir) as trainer_side:
        stats = trainer_side.update_weights(iter_safetensors(perturbed_dir), weight_version="tensor-1")
    assert stats.tensors == 87 and stats.buckets >= 10
    got = generations(server)
    assert_same_generations(got, fresh)
    assert {s.weight_version for s in got} == {"tensor-1"}
    server.update_weights(iter_safetensors(tiny_hf_dir))  # back to the original weights, from disk


def test_the_server_holds_the_trainer_to_sglangs_order(server, baseline, tiny_hf_dir):
    """As SGLang 0.5.23: tensor and broadcast updates only inside a session, one session at a time, no update into
    released weights; a failed update still closes the session it opened."""
    from megatron_sapo.rollout.weight_sync import pack_bucket, serialize_named_tensors

    url = server.urls[0]
    _, views = pack_bucket([("model.norm.weight", torch.ones(64))])
    tensor_update = {"serialized_named_tensors": [serialize_named_tensors(views)]}
    outside = "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
    assert post_json(url, "/update_weights_from_tensor", tensor_update) == (400, {"success": False, "message": outside})
    status, reply = post_json(url, "/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []})
    assert status == 400 and "must run between begin_weight_update() and end_weight_update()" in reply["message"]
    assert post_json(url, "/end_weight_update", {})[1]["message"].startswith("no weight-update session is open")
    assert post_json(url, "/begin_weight_update", {})[0] == 200
    try:
        assert post_json(url, "/begin_weight_update", {})[1]["message"].startswith("a weight-update session is already")
        no_payload = {**tensor_update, "serialized_named_tensors": []}
        assert post_json(url, "/update_weights_from_tensor", no_payload)[0] == 400
        server.release_memory(["weights"])
        status, reply = post_json(url, "/update_weights_from_tensor", tensor_update)
        assert status == 400 and "the weights are released" in reply["message"]
        server.resume_memory(["weights"])
    finally:
        assert post_json(url, "/end_weight_update", {})[0] == 200

    config = RolloutConfig(backend="external", urls=server.urls, api_key=server.api_key, weight_sync="tensor",
                           bucket_size_mb=BUCKET_MB)  # fmt: skip
    with RolloutEngine(config, model_path=tiny_hf_dir) as trainer_side:
        bad = [("model.norm.weight", torch.ones(64)), ("model.layers.0.mlp.not_a_weight", torch.ones(4))]
        message = r"update_weights_from_tensor: HTTP 400: Failed to update weights from tensors: model.layers.0.mlp"
        with pytest.raises(RolloutError, match=message + r".not_a_weight: no such weight"):
            trainer_side.update_weights(iter(bad))
    assert post_json(url, "/begin_weight_update", {})[0] == 200  # the failed update closed its session
    assert post_json(url, "/end_weight_update", {})[0] == 200
    assert_same_generations(generations(server), baseline)  # the refused bucket changed nothing


def test_a_refused_broadcast_bucket_fails_clearly_and_the_next_update_works(server, baseline, tiny_hf_dir):
    config = RolloutConfig(backend="external", urls=server.urls, api_key=server.api_key, weight_sync="distributed",
                           bucket_size_mb=BUCKET_MB,
                           weight_sync_timeout_s=60)  # fmt: skip
    with RolloutEngine(config, model_path=tiny_hf_dir) as trainer_side:
        bad = [("model.norm.weight", torch.ones(64)), ("model.layers.0.mlp.not_a_weight", torch.ones(4))]
        with pytest.raises(RolloutError, match=r"update_weights_from_distributed: HTTP 400: Failed to update parameter "
                                               r"online: model.layers.0.mlp.not_a_weight: no such weight"):  # fmt: skip
            trainer_side.update_weights(iter(bad))
        # The refused bucket changed nothing; a full update through a re-formed group restores the original.
        stats = trainer_side.update_weights(iter_safetensors(tiny_hf_dir))
        assert stats.tensors == 87
    assert_same_generations(generations(server), baseline)


@pytest.mark.parametrize("family", ["qwen2"])
def test_megatron_export_of_a_tied_dense_model_updates_the_server(family, tiny_model, tmp_path):
    """The trainer's path for a dense model with tied embeddings under PP=2 (the last stage holds a copy of the
    embedding): the export sends the embedding once and no lm_head.weight (SGLang 0.5.23's Qwen2/Qwen3
    ``load_weights`` fill a tied lm_head from model.embed_tokens.weight), and the server then generates what it
    generates from the new checkpoint's own tensors (as a fresh server does: the tests above)."""
    original = tiny_model(family)
    perturbed = perturbed_copy(original, str(tmp_path / "perturbed"))
    result = torchrun("megatron_weight_sync.py", "--start-from", original, "--hf-dir", perturbed, "--pp", "2",
                      timeout=300)  # fmt: skip
    assert result["mode"] == "distributed"
    stored = [name for name, _ in iter_safetensors(perturbed)]
    assert sorted(result["names"]) == sorted(stored) and "lm_head.weight" not in stored
    assert result["tensors"] == len(stored) == 50
    before, after, from_disk = result["before"], result["generations"], result["from_disk"]
    assert [ids for ids, _, _ in before] != [ids for ids, _, _ in from_disk]  # the perturbation shows
    assert [ids for ids, _, _ in after] == [ids for ids, _, _ in from_disk]
    worst = max(abs(a - b) for (_, x, _), (_, y, _) in zip(after, from_disk, strict=True)
                for a, b in zip(x, y, strict=True))  # fmt: skip
    assert worst <= 1e-5, worst
    assert {v for _, _, v in after} == {"megatron-1"}


@pytest.mark.parametrize("weight_sync", ["disk", "distributed"])
def test_without_the_runs_api_key_weight_updates_are_refused_and_nothing_changes(server, baseline, perturbed_dir,
                                                                                 tiny_hf_dir, weight_sync, tmp_path):
    """The embedded server launched with a per-run key, as SGLang with --api-key: another client (no key, a wrong
    key) gets SGLang's 401 for generation and every weight-update call, and the served weights stay as they were."""
    for key in (None, "not-the-key"):
        config = RolloutConfig(backend="external", urls=server.urls, api_key=key, weight_sync=weight_sync,
                               weight_sync_dir=str(tmp_path / "w"), max_retries=0)  # fmt: skip
        with pytest.raises((RolloutError, InputError), match=r"HTTP 401: the server refused this run's API key"):
            with RolloutEngine(config, model_path=tiny_hf_dir) as intruder:
                intruder.update_weights(iter_safetensors(perturbed_dir))
        status, reply = _unkeyed_generate(server.urls[0], key)
        assert (status, reply) == (401, {"error": "Unauthorized"})
    assert_same_generations(generations(server), baseline)
    assert http_status(server.urls[0] + "/health") == 200  # probes need no key, as in SGLang


def _unkeyed_generate(url: str, key: str | None):
    import json
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url + "/generate", data=json.dumps({"input_ids": [1, 2, 3]}).encode(),
                                     headers=headers)  # fmt: skip
    try:
        urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    return 200, None
