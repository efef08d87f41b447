"""``model.path=org/name``: the real huggingface_hub download code against a Hub stand-in on loopback
(tests/hub_standin.py, reached through ``HF_ENDPOINT``), the HF cache with ``HF_HUB_OFFLINE=1``, and each failure
as one line. Nothing reaches the internet: every process gets ``HF_ENDPOINT`` and an ``HF_HOME`` of its own."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from hub_standin import HubStandIn
from test_trainer import RECIPE
from torchrun import free_port

from megatron_sapo.hub import parse_hub_id

RESOLVE = "import sys; from megatron_sapo.hub import resolve_model_path; print(resolve_model_path(sys.argv[1]))"
LOAD_CONFIG = (
    "import sys; from megatron_sapo.config import load_config; "
    "print(load_config(sys.argv[1], sys.argv[2:], world_size=2).model.path)"
)


@pytest.fixture(scope="module")
def repo_files(tiny_hf_dir):
    """The tiny model's files as a Hub repo, with a pytorch_model.bin that a run must not download."""
    files = {name: open(os.path.join(tiny_hf_dir, name), "rb").read() for name in sorted(os.listdir(tiny_hf_dir))
             if os.path.isfile(os.path.join(tiny_hf_dir, name))}  # fmt: skip
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(files)
    return files | {"pytorch_model.bin": b"\0" * 4096}


def _env(hf_home: str, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return env | {"HF_HOME": hf_home, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def _run(code: str, args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_hub_ids_are_told_from_folders(tmp_path, monkeypatch):
    assert parse_hub_id("Qwen/Qwen3-30B-A3B-Base") == ("Qwen/Qwen3-30B-A3B-Base", None)
    assert parse_hub_id("Qwen/Qwen3-0.6B@main") == ("Qwen/Qwen3-0.6B", "main")
    assert parse_hub_id("org/model@0123abc") == ("org/model", "0123abc")
    (tmp_path / "org").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir()
    assert parse_hub_id("org/model") is None  # an existing folder wins
    for path in ("/abs/org/model", "./org/x", "~/models/x", "a/b/c", "model", "-org/x", "org/", ""):
        assert parse_hub_id(path) is None, path


def test_hub_id_downloads_once_per_node_then_resolves_from_the_cache(repo_files, tiny_hf_dir, tmp_path):
    """Two ranks of a node load the same config with model.path=org/tiny at once: each file crosses the wire once,
    only config, tokenizer and safetensors, byte for byte; afterwards the cache answers, offline too."""
    hf_home = str(tmp_path / "hf")
    prompts = tmp_path / "train.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    overrides = ["model.path=org/tiny", "model.mcore_checkpoint=null", f"data.train_files=[{prompts}]"]
    with HubStandIn({"org/tiny": repo_files}) as hub:
        env = [_env(hf_home, hub.url, LOCAL_RANK=str(r), RANK=str(r), WORLD_SIZE="2") for r in (0, 1)]
        ranks = [subprocess.Popen([sys.executable, "-c", LOAD_CONFIG, RECIPE, *overrides], env=env[r],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in (0, 1)]  # fmt: skip
        outputs = [rank.communicate(timeout=180) for rank in ranks]
        for rank, (_, err) in zip(ranks, outputs):
            assert rank.returncode == 0, err[-3000:]
        paths = {out.strip().splitlines()[-1] for out, _ in outputs}
        assert len(paths) == 1, paths
        snapshot = paths.pop()
        assert snapshot.startswith(os.path.join(hf_home, "hub", "models--org--tiny", "snapshots") + os.sep)
        wanted = sorted(name for name in repo_files if name != "pytorch_model.bin")
        assert sorted(hub.downloads()) == wanted  # each once, over both ranks; never the .bin copy
        assert sorted(os.listdir(snapshot)) == wanted
        for name in wanted:
            with open(os.path.join(snapshot, name), "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(repo_files[name]).digest(), name
        seen = len(hub.requests)
        again = _run(RESOLVE, ["org/tiny"], _env(hf_home, hub.url))
        assert again.returncode == 0 and again.stdout.strip() == snapshot, again.stderr[-2000:]
        assert len(hub.requests) == seen  # the cache answered: not one request
    offline = _run(RESOLVE, ["org/tiny"], _env(hf_home, hub.url, HF_HUB_OFFLINE="1"))  # the stand-in is gone
    assert offline.returncode == 0 and offline.stdout.strip() == snapshot, offline.stderr[-2000:]


FAILURES = {
    # case: (model.path, extra env, what the one line must say)
    "unknown_repo": ("org/missing", {}, "no model org/missing on the Hub"),
    "gated_repo": ("org/gated", {}, "org/gated is gated on the Hub"),
    "unknown_revision": ("org/tiny@v9", {}, "org/tiny has no revision 'v9'"),
    "offline_without_cache": ("org/tiny", {"HF_HUB_OFFLINE": "1"}, "not in the HF cache"),
    "hub_unreachable": ("org/tiny", {"HF_ENDPOINT": "closed"}, "cannot be reached"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_hub_failures_are_one_line_naming_the_id_the_cache_and_the_fix(case, repo_files, tmp_path):
    path, extra, expected = FAILURES[case]
    hf_home = str(tmp_path / "hf")
    with HubStandIn({"org/tiny": repo_files, "org/gated": repo_files}, gated=("org/gated",)) as hub:
        if extra.get("HF_ENDPOINT") == "closed":
            extra = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
        run = subprocess.run([sys.executable, "-m", "megatron_sapo.train", "--config", RECIPE, f"model.path={path}"],
                             env=_env(hf_home, hub.url, **extra), capture_output=True, text=True,
                             timeout=180)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: model.path={path}: "), run.stderr[-3000:]
    assert expected in lines[0] and os.path.join(hf_home, "hub") in lines[0], lines[0]
    assert "Traceback" not in run.stderr


SEED_LINE = (
    "import sys; from megatron_sapo.config import load_config; from megatron_sapo.train import parse_args; "
    "args = parse_args(sys.argv[1:]); print(load_config(args.config, args.overrides, world_size=8).model.path)"
)


def test_the_seeds_first_command_line_loads_with_its_hub_id_as_written(tmp_path):
    """Example 1 of the seed, model.path=Qwen/Qwen3-30B-A3B-Base untouched, against a stand-in serving a tiny
    Qwen3-MoE (8 experts, for its EP=8) under that id."""
    from test_seed_command_lines import EXAMPLE_1, VERL_PROGRAM

    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl
    from megatron_sapo.models.tiny import make_tiny_model, tiny_sizes

    model = make_tiny_model(str(tmp_path / "model"), "qwen3_moe",
                            tiny_sizes("qwen3_moe", num_experts=8, max_position_embeddings=16384))  # fmt: skip
    files = {name: open(os.path.join(model, name), "rb").read() for name in os.listdir(model)}
    train = write_arithmetic_jsonl(str(tmp_path / "train.jsonl"), num=8, max_operand=5)
    tokens = EXAMPLE_1.replace("\\\n", " ").split()
    assert tokens[:3] == VERL_PROGRAM and "actor_rollout_ref.model.path=Qwen/Qwen3-30B-A3B-Base" in tokens
    with HubStandIn({"Qwen/Qwen3-30B-A3B-Base": files}) as hub:
        run = _run(SEED_LINE, [*tokens[3:], f"data.train_files=[{train}]"], _env(str(tmp_path / "hf"), hub.url))
    assert run.returncode == 0, run.stderr[-3000:]
    snapshot = run.stdout.strip().splitlines()[-1]
    assert "models--Qwen--Qwen3-30B-A3B-Base" in snapshot and os.path.isfile(os.path.join(snapshot, "config.json"))
    assert sorted(hub.downloads()) == sorted(files)
