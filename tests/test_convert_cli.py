"""The conversion CLIs: bad input gets one clear error line, exit status 2, and nothing at --out."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_TO_MCORE = os.path.join(ROOT, "tools", "convert_hf_to_mcore.py")


def run(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def hf_copy(tiny_hf_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, path)
    return path


def edit_weights(hf_dir, edit):
    weights = load_file(hf_dir / "model.safetensors")
    edit(weights)
    save_file(weights, hf_dir / "model.safetensors")


def edit_config(hf_dir, **changes):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


CASES = {
    "unknown_architecture": (
        lambda d: edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama"),
        [],
        "model_type='llama' (architectures=['LlamaForCausalLM']) is not supported; megatron_sapo supports qwen2",
    ),
    "missing_tensor": (
        lambda d: edit_weights(d, lambda w: w.pop("model.layers.2.mlp.experts.3.up_proj.weight")),
        [],
        "missing tensor model.layers.2.mlp.experts.3.up_proj.weight",
    ),
    "extra_tensor": (
        lambda d: edit_weights(d, lambda w: w.update({"model.layers.9.mlp.gate.weight": torch.zeros(4, 64)})),
        [],
        "unexpected tensor model.layers.9.mlp.gate.weight",
    ),
    "misshaped_tensor": (
        lambda d: edit_weights(d, lambda w: w.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(40, 64)})),
        [],
        "tensor model.layers.1.self_attn.k_proj.weight has shape [40, 64], config.json implies [48, 64]",
    ),
    "unreadable_weights": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
        [],
        "unreadable safetensors file",
    ),
    "unreadable_config": (lambda d: (d / "config.json").write_text("{not json"), [], "config.json: unreadable"),
    "no_checkpoint": (lambda d: (d / "model.safetensors").unlink(), [], "no model.safetensors"),
    "invalid_layout": (lambda d: None, ["--tp", "3"], "= 3 does not divide the world size 1"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(hf_copy, tmp_path, case):
    corrupt, extra_args, needle = CASES[case]
    corrupt(hf_copy)
    out = tmp_path / "mcore"
    proc = run(HF_TO_MCORE, "--hf-dir", str(hf_copy), "--out", str(out), *extra_args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "mcore.tmp").exists()


def test_existing_output_is_never_overwritten_without_flag(tiny_hf_dir, tmp_path):
    out = tmp_path / "mcore"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run(HF_TO_MCORE, "--hf-dir", tiny_hf_dir, "--out", str(out))
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_killed_conversion_leaves_no_partial_checkpoint(tiny_hf_dir, tmp_path):
    out = tmp_path / "mcore"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, HF_TO_MCORE, "--hf-dir", tiny_hf_dir, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "mcore.tmp").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed mid-save"
    helpers = psutil.Process(proc.pid).children(recursive=True)  # megatron's writer-results Manager among them
    assert any("spawn_main" in " ".join(helper.cmdline()) for helper in helpers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # none outlives the conversion (megatron_sapo.lifetime's watcher ends them within its 1 s period)
    deadline = time.monotonic() + 10
    while [helper for helper in helpers if _running(helper)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [helper.pid for helper in helpers if _running(helper)]


def _running(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie has ended; only its reaping is left
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("family", ["qwen2"])
def test_round_trip_cli_is_bit_exact(tiny_model, family, tmp_path):
    """--verify against transformers and back, for a dense family with tied embeddings (the MoE's CLI round trip is
    the bf16 one below, its --verify the TP/EP one)."""
    tiny_hf_dir = tiny_model(family)
    mcore, hf_out = tmp_path / "mcore", tmp_path / "hf_out"
    first = run(HF_TO_MCORE, "--hf-dir", tiny_hf_dir, "--out", str(mcore), "--verify")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "OK" in first.stdout
    second = run(os.path.join(ROOT, "tools", "convert_mcore_to_hf.py"), "--mcore-dir", str(mcore),
                 "--hf-template", tiny_hf_dir, "--out", str(hf_out))  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    original, exported = load_file(f"{tiny_hf_dir}/model.safetensors"), load_file(hf_out / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert {"config.json", "tokenizer.model", "generation_config.json"} <= set(os.listdir(hf_out))


# --- dtype, sharded HF output, quiet output, other layouts -------------------------------------------------------

MCORE_TO_HF = os.path.join(ROOT, "tools", "convert_mcore_to_hf.py")
SUMMARY = re.compile(
    r"^wrote \S+ \(.*\): (\d+) tensors, ([\d.]+) GB in ([\d.]+) s \(([\d.]+) GB/s\), peak RSS ([\d.]+) GB per process$"
)


def assert_quiet(proc):
    """Only the converter's own lines: no library warnings, a progress bar, the summary line last."""
    out = proc.stdout + proc.stderr
    assert not re.search(r"warn|Transformer Engine|Apex|deprecat", out, re.IGNORECASE), out[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert SUMMARY.match(lines[-1]), proc.stdout[-2000:]
    assert "tensors " in proc.stderr  # tqdm's bar
    return SUMMARY.match(lines[-1])


def test_config_dtype(hf_copy):
    from megatron_sapo.convert.hf_io import config_dtype
    from megatron_sapo.errors import InputError

    assert config_dtype(str(hf_copy)) == torch.float32  # transformers 5 writes "dtype"
    edit_config(hf_copy, dtype=None, torch_dtype="bfloat16")
    assert config_dtype(str(hf_copy)) == torch.bfloat16
    edit_config(hf_copy, torch_dtype=None)
    assert config_dtype(str(hf_copy)) is None
    edit_config(hf_copy, torch_dtype="int8")
    with pytest.raises(InputError, match="torch_dtype 'int8'"):
        config_dtype(str(hf_copy))


def test_bf16_checkpoint_exported_as_sharded_hf(tiny_hf_dir, tmp_path):
    """--dtype bfloat16 writes a bf16 checkpoint; the export is HF's sharded layout (index + shards of at most
    --max-shard-size), in the template's dtype (float32), equal to the bf16-rounded original, loadable by
    transformers; both CLIs print only their own lines."""
    from megatron_sapo.checkpoint import checkpoint_dtype

    mcore, hf_out = tmp_path / "mcore", tmp_path / "hf_out"
    first = run(HF_TO_MCORE, "--hf-dir", tiny_hf_dir, "--out", str(mcore), "--dtype", "bfloat16")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = assert_quiet(first)
    assert int(summary.group(1)) == 87 and "torch.bfloat16" in summary.group(0)
    assert checkpoint_dtype(str(mcore)) == torch.bfloat16
    shard_limit = 100_000
    second = run(MCORE_TO_HF, "--mcore-dir", str(mcore), "--hf-template", tiny_hf_dir, "--out", str(hf_out),
                 "--max-shard-size", "100KB")  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert_quiet(second)

    index = json.loads((hf_out / "model.safetensors.index.json").read_text())
    files = sorted(f for f in os.listdir(hf_out) if f.endswith(".safetensors"))
    assert len(files) > 3 and files == sorted(set(index["weight_map"].values()))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    exported = {}
    for f in files:
        tensors = load_file(hf_out / f)
        assert set(tensors) == {k for k, v in index["weight_map"].items() if v == f}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= shard_limit or len(tensors) == 1
        exported.update(tensors)
    original = load_file(f"{tiny_hf_dir}/model.safetensors")
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in original.values())
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], tensor.to(torch.bfloat16).float()), name

    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(hf_out, output_loading_info=True)
    assert not any(info.values()), info
    reference = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).state_dict()  # transformers' own (fused) names
    assert all(torch.equal(v, reference[k].to(torch.bfloat16).float()) for k, v in loaded.state_dict().items())


def test_tp_ep_conversion_verifies_and_reloads_under_one_rank(tiny_hf_dir, tmp_path):
    """Two ranks (TP=2 for attention and the vocabulary, EP=2 for the experts) write a checkpoint whose reload
    matches transformers' logits; one rank converts it back bit for bit."""
    from torchrun import free_port

    mcore, hf_out = tmp_path / "mcore", tmp_path / "hf_out"
    launch = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}"]  # fmt: skip
    first = run(*launch, HF_TO_MCORE, "--hf-dir", tiny_hf_dir, "--out", str(mcore), "--tp", "2", "--ep", "2",
                "--verify")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert "OK" in first.stdout and "tp=2 pp=1 ep=2" in first.stdout
    second = run(MCORE_TO_HF, "--mcore-dir", str(mcore), "--hf-template", tiny_hf_dir, "--out", str(hf_out))
    assert second.returncode == 0, second.stderr[-3000:]
    original, exported = load_file(f"{tiny_hf_dir}/model.safetensors"), load_file(hf_out / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
