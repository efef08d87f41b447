#!/usr/bin/env bash
# The CPU demo behind `make demo`: SAPO on a tiny Qwen3-MoE learning single-digit addition, under
# torchrun --nproc_per_node=2 (EP=2) with the embedded rollout server. About 5 minutes on 2 cores.
#   1. a tiny random Qwen3-MoE + sentencepiece tokenizer      (tools/make_tiny_model.py)
#   2. the toy prompt set: a+b for a, b in 0..5               (python -m megatron_sapo.data.arithmetic)
#   3. a short supervised warm start (answer format)          (recipes/tiny_moe/warm_start.py)
#   4. HF -> Megatron checkpoint, verified against transformers (tools/convert_hf_to_mcore.py)
#   5. SAPO training, then the metrics plot                   (megatron_sapo.train, tools/plot_metrics.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

rm -rf "$OUT" && mkdir -p "$OUT"
$PYTHON tools/make_tiny_model.py --family qwen3_moe --out "$OUT/tiny" > /dev/null
$PYTHON -m megatron_sapo.data.arithmetic --out "$OUT/train.jsonl" --num 36 --max-operand 5
$PYTHON recipes/tiny_moe/warm_start.py --hf-dir "$OUT/tiny" --train-file "$OUT/train.jsonl" --out "$OUT/warm" --steps 50
$PYTHON tools/convert_hf_to_mcore.py --hf-dir "$OUT/warm" --out "$OUT/mcore" --verify
$PYTHON -m torch.distributed.run --nproc_per_node=2 -m megatron_sapo.train --config recipes/tiny_moe/config.yaml \
    model.path="$OUT/warm" model.mcore_checkpoint="$OUT/mcore" data.train_files="[$OUT/train.jsonl]" \
    data.val_files="[$OUT/train.jsonl]" \
    trainer.output_dir="$OUT/run" "$@"
$PYTHON tools/plot_metrics.py "$OUT/run"
$PYTHON - "$OUT/run" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in rows if "reward/mean" in r]  # step 0 holds only the validation before training
first, last = train[:10], train[-10:]
mean = lambda part: sum(r["reward/mean"] for r in part) / len(part)
print(f"mean reward: first 10 steps {mean(first):.2f} -> last 10 steps {mean(last):.2f}")
val = [r for r in rows if "val/reward/mean" in r]
if val:
    print(f"greedy accuracy on the 36 problems: step {val[0]['step']} {val[0]['val/reward/mean']:.2f} -> "
          f"step {val[-1]['step']} {val[-1]['val/reward/mean']:.2f}")
print(f"run folder: {sys.argv[1]} (metrics.jsonl, metrics.png, checkpoints/, hf/)")
PY
