"""Checkpoint conversion against a plain copy, side by side in one run: wall time and peak RSS per process.

    python bench/convert_bench.py [--work /tmp/convert_bench] [--model DIR] [--repeat 3]

Makes (or reuses, ``--model``) a random Qwen3-MoE HF checkpoint of ≥ 2 GB (16 layers, hidden 1024, 16 experts,
fp32) with ``tools/make_tiny_model.py``, reads it once so the page cache is warm for every contender, then
times, in each of ``--repeat`` rounds, one after the other:

- ``cp -r`` of the HF folder, and ``cp -r`` followed by ``sync`` (megatron's checkpoint writer fsyncs every file,
  so the converter's time includes getting the bytes to disk; the copy's ratio is given against both),
- HF → Megatron of the 4-layer tiny model: the fixed cost (imports, process groups, helper processes),
- HF → Megatron with 1 process, and with 2 processes (EP=2) with and without the fully-parallel save,
- Megatron → HF with 1 process (5 GB shards); after the first round, the round trip is checked bit for bit.

Each line carries the load average when it started (the machine may be shared). The speed ratio is given two
ways, each round against that round's ``cp -r && sync``: total wall time, and per GB beyond the fixed cost
(``copy / (time - fixed cost)``, the ratio a large checkpoint approaches); the target (≥ 0.5×) is read per GB, on
the median round. Peak RSS is each converter process's VmHWM (polled from /proc while it runs) against the bound
1.3 × the process's own shard + 1 GB; "writers" is the largest VmHWM of the processes megatron's checkpoint writer
forks from a rank (the rank's pages they share, plus the pages of the mapped HF files they read: file-backed page
cache, not memory of their own). The last lines estimate Qwen3-30B-A3B (bf16) from the best round's fixed cost and
per-GB cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
BIG = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
           head_dim=64, num_experts=16, moe_intermediate_size=576)  # fmt: skip
# Qwen3-30B-A3B's config.json (the fields the size depends on)
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     max_position_embeddings=40960, norm_topk_prob=True)  # fmt: skip
RSS_FACTOR, RSS_SLACK = 1.3, 1e9


def shard_bytes(config: dict, bytes_per_param: int, ep: int) -> tuple[int, int]:
    """(whole checkpoint, one rank's shard under expert parallelism ``ep``) in bytes."""
    from megatron_sapo.convert.mapping import hf_shapes
    from megatron_sapo.models import arch_from_config

    arch = arch_from_config({"model_type": "qwen3_moe", **config})
    total = expert = 0
    for name, shape in hf_shapes(arch).items():
        n = 1
        for d in shape:
            n *= d
        total += n
        expert += n if ".mlp.experts." in name else 0
    return total * bytes_per_param, (total - expert + expert // ep) * bytes_per_param


def timed(cmd: list[str], tool: str | None = None) -> dict:
    """Run ``cmd``; wall seconds, the peak RSS of each process running ``tool`` and, apart, of the processes those
    fork (megatron's checkpoint writers)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    peaks: dict[int, int] = {}
    writers: dict[int, int] = {}  # processes a rank forked (megatron's checkpoint writers)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def poll():
        root = psutil.Process(proc.pid)
        while not done.wait(0.05):
            try:
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            runs_tool = {}
            for p in family:
                try:
                    cmd = " ".join(p.cmdline())
                    runs_tool[p.pid] = (tool in cmd and "torch.distributed.run" not in cmd, p.ppid())
                except psutil.Error:
                    pass
            for pid, (is_tool, ppid) in runs_tool.items():
                if is_tool:
                    forked = runs_tool.get(ppid, (False,))[0]  # a writer a rank forked, not a rank
                    try:
                        with open(f"/proc/{pid}/status") as f:
                            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
                        found = writers if forked else peaks
                        found[pid] = max(found.get(pid, 0), hwm)
                    except (OSError, StopIteration):
                        pass

    if tool:
        threading.Thread(target=poll, daemon=True).start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}\n{err[-3000:]}")
    return {"seconds": seconds, "peaks": sorted(peaks.values()), "writers": sorted(writers.values()), "stdout": out}


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            "--master_port=29533"]  # fmt: skip


def bit_exact(a_dir: str, b_dir: str) -> bool:
    from megatron_sapo.convert.hf_io import HFCheckpointReader

    a, b = HFCheckpointReader(a_dir), HFCheckpointReader(b_dir)
    return a.names() == b.names() and all(a.get(name).equal(b.get(name)) for name in sorted(a.names()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/convert_bench", help="scratch folder (about 6× the model)")
    parser.add_argument("--model", default=None, help="an existing HF checkpoint to use instead of making one")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every measurement (a shared machine drifts)")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    hf = args.model or os.path.join(args.work, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        sizes = [f"--{k.replace('_', '-')}={v}" for k, v in BIG.items()]
        print(f"making a random Qwen3-MoE at {hf} ...", flush=True)
        timed([sys.executable, os.path.join(TOOLS, "make_tiny_model.py"), "--out", hf, *sizes])
    tiny = os.path.join(args.work, "tiny")
    if not os.path.exists(os.path.join(tiny, "config.json")):
        timed([sys.executable, os.path.join(TOOLS, "make_tiny_model.py"), "--out", tiny])
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    size, shard_ep2 = shard_bytes(config, 4, 1)[0], shard_bytes(config, 4, 2)[1]
    gb = size / 1e9
    for root, _, names in os.walk(hf):  # warm the page cache for every contender alike
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass

    def out(name):
        path = os.path.join(args.work, name)
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        return path

    threads = os.environ.get("OMP_NUM_THREADS", 2)
    print(f"checkpoint: {hf}, {gb:.2f} GB fp32 ({config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}, {config.get('num_experts') or config.get('num_local_experts')} experts); "
          f"OMP_NUM_THREADS={threads}; {args.repeat} rounds")  # fmt: skip
    to_mcore = os.path.join(TOOLS, "convert_hf_to_mcore.py")
    to_hf = os.path.join(TOOLS, "convert_mcore_to_hf.py")
    save_modes = (("--fully-parallel", "fully-parallel save"), ("--no-fully-parallel", "first replica writes"))
    contenders = [  # (label, command, tool whose processes' RSS is polled, the bytes one such process holds)
        ("cp -r", lambda: ["cp", "-r", hf, out("copy")], None, None),
        ("cp -r && sync", lambda: ["sh", "-c", f"cp -r {hf} {out('copy')} && sync"], None, None),
        # next to the 1-process run it is subtracted from: the machine's load drifts
        ("HF→Megatron of the tiny model (fixed cost)",
         lambda: [sys.executable, to_mcore, "--hf-dir", tiny, "--out", out("mcore_tiny")], "convert_hf_to_mcore", None),
        ("HF→Megatron, 1 process", lambda: [sys.executable, to_mcore, "--hf-dir", hf, "--out", out("mcore1")],
         "convert_hf_to_mcore", size),
        *((f"HF→Megatron, 2 processes EP=2, {label}",
           lambda flag=flag: [*torchrun(2), to_mcore, "--hf-dir", hf, "--out", out("mcore2"), "--ep", "2", flag],
           "convert_hf_to_mcore", shard_ep2)
          for flag, label in save_modes),
        ("Megatron→HF, 1 process", lambda: [sys.executable, to_hf, "--mcore-dir", os.path.join(args.work, "mcore1"),
                                            "--hf-template", hf, "--out", out("hf_back")], "convert_mcore_to_hf", size),
    ]  # fmt: skip
    times: dict[str, list[float]] = {label: [] for label, *_ in contenders}
    print(f"{'':52s} {'load':>5s} {'time':>7s} {'copy/time':>10s} {'× sync copy':>11s} {'peak RSS/proc':>14s} "
          f"{'RSS/ckpt':>9s} {'bound':>8s} {'writers':>8s}")  # fmt: skip
    for round_ in range(args.repeat):
        print(f"round {round_ + 1}", flush=True)
        for label, command, tool, own in contenders:
            subprocess.run(["sync"], check=True)
            load = os.getloadavg()[0]
            result = timed(command(), tool)
            times[label].append(result["seconds"])
            t = result["seconds"]
            copy, copy_sync = times["cp -r"][-1], (times["cp -r && sync"] or [t])[-1]
            line = f"{label:52s} {load:5.1f} {t:6.1f}s {copy / t:9.2f}× {copy_sync / t:10.2f}×"
            if result["peaks"]:
                peak = max(result["peaks"])
                bound = f"{RSS_FACTOR * own / 1e9 + RSS_SLACK / 1e9:.2f} GB" if own else ""
                ok = "" if not own else (" ok" if peak <= RSS_FACTOR * own + RSS_SLACK else " OVER")
                writers = f"{max(result['writers']) / 1e9:5.2f} GB" if result["writers"] else ""
                line += f" {peak / 1e9:11.2f} GB {peak / size:8.2f}× {bound:>8s}{ok:3s} {writers:>8s}"
            print(line, flush=True)
        out("copy")  # removes it
        out("mcore2")
        if round_ == 0:
            print(f"round trip HF → Megatron → HF bit-exact: {bit_exact(hf, os.path.join(args.work, 'hf_back'))}")

    # Each round's ratios against that round's copy: the machine's load moves between rounds, not within a pair.
    one, back = times["HF→Megatron, 1 process"], times["Megatron→HF, 1 process"]
    fixed, copy_sync = times["HF→Megatron of the tiny model (fixed cost)"], times["cp -r && sync"]
    total_ratio = [c / t for c, t in zip(copy_sync, one)]
    # None: the small conversion took as long as the large one, the load moved too much within the round
    marginal_ratio = [c / (t - f) if t > f else None for c, t, f in zip(copy_sync, one, fixed)]

    def listed(values):
        return " / ".join("n/a" if v is None else f"{v:.2f}" for v in values)

    print(f"HF→Megatron (1 process) against cp -r && sync, by round: total wall time {listed(total_ratio)}×; "
          f"per GB, beyond the fixed cost {listed(marginal_ratio)}×")  # fmt: skip
    valid = sorted(v for v in marginal_ratio if v is not None)
    if valid:
        median = valid[len(valid) // 2]
        print(f"target ≥ 0.5× copy speed per GB: {'met' if median >= 0.5 else 'MISSED'} (median {median:.2f}× "
              f"over {len(valid)} rounds)")  # fmt: skip
    best = {label: min(values) for label, values in times.items()}
    per_gb = (best["HF→Megatron, 1 process"] - best["HF→Megatron of the tiny model (fixed cost)"]) / gb
    per_gb_back = (min(back) - min(fixed)) / gb
    big, big_ep8 = shard_bytes(QWEN3_30B_A3B, 2, 1)[0], shard_bytes(QWEN3_30B_A3B, 2, 8)[1]
    print(f"best of {args.repeat}: fixed cost {min(fixed):.1f} s; per GB: HF→Megatron {per_gb:.2f} s, Megatron→HF "
          f"{per_gb_back:.2f} s (cp -r && sync: {min(copy_sync) / gb:.2f} s)")  # fmt: skip
    print(f"Qwen3-30B-A3B bf16 ({big / 1e9:.1f} GB), 1 process, this disk: HF→Megatron ≈ "
          f"{(min(fixed) + per_gb * big / 1e9) / 60:.1f} min, Megatron→HF ≈ "
          f"{(min(fixed) + per_gb_back * big / 1e9) / 60:.1f} min; peak RSS bound "
          f"{(RSS_FACTOR * big + RSS_SLACK) / 1e9:.0f} GB (1 process), "
          f"{(RSS_FACTOR * big_ep8 + RSS_SLACK) / 1e9:.1f} GB per process with EP=8")  # fmt: skip
    for name in ("mcore1", "hf_back", "mcore_tiny"):
        shutil.rmtree(os.path.join(args.work, name), ignore_errors=True)


if __name__ == "__main__":
    main()
