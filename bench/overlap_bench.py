"""Rollout and training in turn vs overlapped: the demo model trained for the same steps with
``trainer.rollout_mode=sync`` and ``one_step_off``, one after the other in one invocation, and their throughput.

    python bench/overlap_bench.py [--demo outputs/demo] [--steps 12] [--skip 2]

Both runs use the same layout, the embedded server in its own process on its own thread (TP 1, broadcast weight
sync: the demo recipe's colocated TP-2 server with the memory saver cannot overlap), so the mode is the only
difference. Uses ``make demo``'s warm-started model when ``--demo`` holds one, else a fresh tiny model. Prints each
mode's tokens/s (the steps' tokens over the steps' summed phase time, after ``--skip`` warm-up steps), the ratio,
and each phase's share of the step (step_bench.py's phases; in one_step_off ``rollout`` is only the time the
trainer waits for the batch generated during the step).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from step_bench import PHASES, phase_shares

from megatron_sapo.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "tiny_moe", "config.yaml")
DEDICATED = ["rollout.tp_size=1", "rollout.enable_memory_saver=false", "rollout.weight_sync=distributed"]


def _inputs(demo: str, scratch: str) -> list[str]:
    warm, train = os.path.join(demo, "warm"), os.path.join(demo, "train.jsonl")
    if os.path.isfile(os.path.join(warm, "config.json")) and os.path.isfile(train):
        mcore = os.path.join(demo, "mcore")
        mcore = mcore if os.path.isdir(mcore) else "null"
        return [f"model.path={warm}", f"model.mcore_checkpoint={mcore}", f"data.train_files=[{train}]"]
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl
    from megatron_sapo.models.tiny import make_tiny_model

    print(f"no warm-started demo model in {demo} (make demo): a fresh tiny model instead")
    hf = make_tiny_model(os.path.join(scratch, "tiny"), "qwen3_moe")
    train = write_arithmetic_jsonl(os.path.join(scratch, "train.jsonl"), num=36, max_operand=5)
    return [f"model.path={hf}", "model.mcore_checkpoint=null", f"data.train_files=[{train}]",
            "actor.router_replay.mode=disabled"]  # fmt: skip


def _run(mode: str, inputs: list[str], steps: int, out: str) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "megatron_sapo.train",
        "--config", RECIPE, *inputs, *DEDICATED, f"trainer.rollout_mode={mode}", f"trainer.total_steps={steps}",
        f"trainer.output_dir={out}", "trainer.resume=disable", "trainer.save_freq=0", "data.val_files=[]",
        "trainer.export_hf_at_end=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {mode} run failed ({proc.returncode})\n{proc.stderr[-4000:]}")
    return [row for row in read_metrics(out) if "timing/update" in row]


def summary(rows: list[dict]) -> tuple[float, float, float, dict[str, float]]:
    """Over ``rows``: tokens/s (their tokens over their summed phase time), mean seconds and tokens per step, and
    each phase's share."""
    times = [sum(row.get(f"timing/{phase}", 0.0) for phase in PHASES) for row in rows]
    tokens = sum(row["perf/tokens_per_s"] * t for row, t in zip(rows, times))
    return tokens / sum(times), sum(times) / len(rows), tokens / len(rows), phase_shares(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=os.path.join(REPO, "outputs", "demo"), help="make demo's output folder")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps to leave out")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as scratch:
        inputs = _inputs(args.demo, scratch)
        results = {}
        for mode in ("sync", "one_step_off"):
            rows = _run(mode, inputs, args.steps, os.path.join(scratch, mode))[args.skip :]
            results[mode] = summary(rows)
            reward = sum(row["reward/mean"] for row in rows) / len(rows)
            staleness = max(row.get("rollout/staleness_max", 0.0) for row in rows)
            tokens_per_s, step_s, step_tokens, shares = results[mode]
            print(f"{mode:<13} {tokens_per_s:8.1f} tokens/s   {step_s:.3f} s/step   {step_tokens:.0f} tokens/step   "
                  f"mean reward {reward:.3f}   max staleness {staleness:.0f}   ({len(rows)} steps after "
                  f"{args.skip} warm-up)")  # fmt: skip
            for phase, share in shares.items():
                print(f"  {phase:<14} {share:6.1%} of step time")
    print(f"one_step_off / sync: {results['one_step_off'][0] / results['sync'][0]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
