"""One-shot GPU smoke test of the Qwen3-30B-A3B recipe's switches on one H100/H200 (``make gpu-smoke``, < 8 min).

    python bench/gpu_smoke.py [--out outputs/gpu_smoke] [--steps 3]

On CUDA/NCCL with a world of one process it runs, on a tiny random Qwen3-MoE:

1. the trainer, in bf16, from ``recipes/qwen3_30b_a3b/config.yaml`` with only sizes changed (as
   tests/test_recipe_twin.py does on CPU): the hybrid CPU optimizer (fraction 1.0), param/grad/optimizer offload,
   full recompute, and what the actor turns on with CUDA (DDP's overlapped grad reduce-scatter and param
   all-gather; Megatron's fused kernels too when Transformer Engine is installed). The rollout backend is the
   embedded server, which runs on the CPU (``rollout/server.py``), so the rollout phase shows what the trainer
   leaves on the GPU while it is offloaded.
2. the actor alone, with the recipe's hybrid optimizer and with the ordinary distributed optimizer: GPU memory
   (``torch.cuda.memory_allocated``) before offload, after it and after reload.
3. ``bench/loss_bench.py`` on the GPU at Qwen3's vocabulary: our loss kernel against Megatron's
   ``vocab_parallel_cross_entropy``, and its achieved bandwidth against the GPU's HBM peak.

It prints one table and writes it to ``OUT/gpu_smoke.txt``; it exits non-zero when a check fails (the trainer's
log-probs far from the rollout engine's, offload freeing nothing, the loss kernel disagreeing with the reference).
Nothing here runs in ``make test``; it needs only torch with CUDA and the wheels ``make wheelhouse`` collects
(``--print-requirements``: megatron-core 0.19 and the runtime dependencies of megatron_sapo that the device image
lacks, :data:`DEVICE_IMAGE_PACKAGES`, pinned to the versions the Python 3.12 test leg runs with: a few MiB, where all
of them, numpy, pyarrow and transformers included, were 108 MB and did not fit the 64 MiB a device call carries).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "qwen3_30b_a3b", "config.yaml")
GIB = 1 << 30
REWARD = """
def char_diversity(data_source, solution_str, ground_truth, extra_info=None):
    return len(set(solution_str)) / max(len(solution_str), 1)
"""


def sizes(hf_dir: str, train_file: str, reward: str, out: str, steps: int) -> list[str]:
    """The twin's overrides of the recipe (tests/test_recipe_twin.py), for one process."""
    return [
        f"model.path={hf_dir}", "model.mcore_checkpoint=null", f"data.train_files=[{train_file}]",
        "data.max_prompt_length=32", "data.max_response_length=16", "data.overlong_buffer_len=8",
        "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "rollout.n=4", "actor.max_tokens_per_micro_batch=256",
        "actor.log_prob_chunk_size=64", "actor.megatron.tensor_model_parallel_size=1",
        "actor.megatron.expert_model_parallel_size=1", "rollout.backend=embedded", "rollout.tp_size=1",
        "rollout.ep_size=1", "reward.type=custom", f"reward.custom_function={reward}", "reward.num_workers=1",
        "trainer.tensorboard=false", "trainer.resume=disable", f"trainer.output_dir={out}",
        f"trainer.total_steps={steps}", "actor.optim.lr=1e-4",
    ]  # fmt: skip


def run_trainer(overrides: list[str]) -> dict:
    from megatron_sapo import trainer
    from megatron_sapo.config import load_config
    from megatron_sapo.metrics import read_metrics

    config = load_config(RECIPE, overrides, world_size=1)
    out = trainer.train(config)
    rows = read_metrics(out)
    last = rows[-1]  # the first step includes start-up costs (compilation, allocator growth)
    return {
        "timings": {k.removeprefix("timing/"): v for k, v in last.items() if k.startswith("timing/")},
        "logprob_diff": max(row["rollout/logprob_diff"] for row in rows),
        "peak": dict(trainer.PHASE_PEAK_BYTES),
        "grad_norm": [row["actor/grad_norm"] for row in rows],
    }


def offload_memory(overrides: list[str]) -> dict[str, int]:
    """memory_allocated before offload, after it and after reload, with the actor's optimizer state allocated."""
    from megatron_sapo.actor import MegatronActor
    from megatron_sapo.config import load_config
    from megatron_sapo.models import load_arch
    from megatron_sapo.parallel.state import initialize_model_parallel

    config = load_config(RECIPE, overrides, world_size=1)
    arch = load_arch(config.model.path)
    initialize_model_parallel(config.actor.megatron.layout, arch=arch)
    actor = MegatronActor(config, arch)
    actor.load_initial_weights()
    actor._allocate_torch_optimizer_state()  # Adam moments of the GPU-side optimizer, as after a step
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    actor.offload()
    offloaded = torch.cuda.memory_allocated()
    actor.reload()
    reloaded = torch.cuda.memory_allocated()
    del actor
    return {"before": before, "offloaded": offloaded, "reloaded": reloaded}


def loss_bench(out_dir: str) -> dict:
    path = os.path.join(out_dir, "loss_bench.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", os.path.join(REPO, "bench",
           "loss_bench.py"), "--tokens", "16384", "--chunk-size", "2048", "--iters", "10", "--json", path]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"loss_bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(path) as f:
        return json.load(f)


def _closure(roots: list[str], skip: set[str] = frozenset()) -> dict[str, str]:
    """Installed distributions ``roots`` need (their non-extra requirements, recursively): {name: version}."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found or key in skip:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[key] = dist.version
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
    return found


# What the lent device machine's image ('cuda': Python 3.12.3, torch 2.11 + CUDA 13) already holds, as the device
# tool's KINDS.md lists it (2026-11-17); the wheelhouse carries only what it lacks, since a device call takes at most
# 64 MiB with the working tree. Names are normalised (lower case, '-').
DEVICE_IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())


def requirements(image: frozenset[str] = DEVICE_IMAGE_PACKAGES) -> list[str]:
    """Pinned wheels for the device image: megatron_sapo's runtime closure (at this venv's versions) without torch's
    own and without what ``image`` already has (kept at the image's versions: setup.py's ranges admit them)."""
    torch_own = set(_closure(["torch"]))
    ours = _closure(["megatron_sapo"], skip=torch_own | set(image))
    return [f"{name}=={version}" for name, version in sorted(ours.items()) if name != "megatron-sapo"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "outputs", "gpu_smoke"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--print-requirements", action="store_true", help="the wheels it needs besides torch")
    args = parser.parse_args()
    if args.print_requirements:
        print("\n".join(requirements()))
        return 0
    if not torch.cuda.is_available():
        print("error: gpu_smoke needs a CUDA GPU", file=sys.stderr)
        return 2
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl
    from megatron_sapo.models import transformer_engine_usable
    from megatron_sapo.models.tiny import make_tiny_model
    from megatron_sapo.parallel.state import destroy, init_distributed

    os.makedirs(args.out, exist_ok=True)
    hf_dir = make_tiny_model(os.path.join(args.out, "tiny"), "qwen3_moe")
    train_file = write_arithmetic_jsonl(os.path.join(args.out, "train.jsonl"), num=32, max_operand=9)
    reward = os.path.join(args.out, "reward.py")
    with open(reward, "w") as f:
        f.write(REWARD)
    base = sizes(hf_dir, train_file, f"{reward}:char_diversity", os.path.join(args.out, "run"), args.steps)
    ordinary = ["actor.megatron.optimizer_cpu_offload=false", "actor.megatron.optimizer_offload_fraction=0.0"]

    init_distributed()
    trained = run_trainer(base)
    hybrid = offload_memory(base)
    plain = offload_memory([*base, *ordinary])
    destroy()
    loss = loss_bench(args.out)

    name = torch.cuda.get_device_name()
    lines = [f"gpu smoke: {name}, torch {torch.__version__}, Transformer Engine "
             f"{'on' if transformer_engine_usable() else 'not installed (unfused kernels)'}"]  # fmt: skip
    lines.append(f"{'trainer (recipe switches), last of ' + str(args.steps) + ' steps':<52}{'seconds':>10}"
                 f"{'peak GiB':>10}")  # fmt: skip
    for phase, seconds in trained["timings"].items():
        peak = trained["peak"].get(phase)
        lines.append(f"  {phase:<50}{seconds:>10.3f}{'' if peak is None else f'{peak / GIB:10.3f}'}")
    lines.append(f"  {'rollout/logprob_diff (trainer vs engine, max)':<50}{trained['logprob_diff']:>10.2e}")
    lines.append(f"{'offload (torch.cuda.memory_allocated, GiB)':<52}{'before':>10}{'offloaded':>10}{'freed':>10}")
    for label, mem in (("hybrid CPU optimizer (recipe)", hybrid), ("distributed optimizer on GPU", plain)):
        freed = mem["before"] - mem["offloaded"]
        lines.append(f"  {label:<50}{mem['before'] / GIB:>10.4f}{mem['offloaded'] / GIB:>10.4f}{freed / GIB:>10.4f}")
    lines.append(f"{'loss kernel, ' + loss['shape']:<52}{'ms':>10}{'GB/s':>10}{'% HBM':>10}")
    for method in ("ours_inplace", "megatron"):
        row = loss["methods"][method]
        share = f"{100 * row['gbps'] * 1e9 / loss['hbm_peak']:10.1f}" if loss.get("hbm_peak") else f"{'?':>10}"
        lines.append(f"  {method:<50}{row['ms']:>10.2f}{row['gbps']:>10.0f}{share}")
    ratio = loss["methods"]["ours_inplace"]["ms"] / loss["methods"]["megatron"]["ms"]
    lines.append(f"  {'ours_inplace / megatron':<50}{ratio:>10.2f}")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "gpu_smoke.txt"), "w") as f:
        f.write(table + "\n")

    failures = []
    if not trained["logprob_diff"] < 0.05:
        failures.append(f"trainer and rollout log-probs differ by {trained['logprob_diff']:.3g} (bf16: < 0.05)")
    if not all(g > 0 for g in trained["grad_norm"]):
        failures.append("a step had no gradient")
    for label, mem in (("hybrid", hybrid), ("ordinary", plain)):
        if not mem["offloaded"] < mem["before"] or mem["reloaded"] != mem["before"]:
            failures.append(f"{label}: offload/reload did not free and restore the GPU memory: {mem}")
    if loss["methods"]["ours_inplace"]["max_diff"] > 0.05:
        failures.append(f"loss kernel log-probs off by {loss['methods']['ours_inplace']['max_diff']:.3g}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
