"""Trainer runs of the Qwen3-30B-A3B recipe, shrunk, one after another in one torchrun (one start-up for all).

    torchrun --nproc_per_node=2 recipe_twin.py --out JSON --runs RUNS_JSON

``RUNS_JSON`` maps a run's name to its ``key=value`` overrides of recipes/qwen3_30b_a3b/config.yaml; each run is
``megatron_sapo.trainer.train`` as ``python -m megatron_sapo.train`` runs it. Rank 0 writes ``{name: output_dir}``.
"""

import argparse
import json
import os

from common import finish

from megatron_sapo.config import load_config
from megatron_sapo.parallel.state import init_distributed
from megatron_sapo.trainer import train

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "qwen3_30b_a3b", "config.yaml")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True)
    args = parser.parse_args()
    with open(args.runs) as f:
        runs = json.load(f)
    init_distributed()
    outputs = {}
    for name, overrides in runs.items():
        outputs[name] = train(load_config(RECIPE, overrides, world_size=int(os.environ["WORLD_SIZE"])))
    finish(args.out, outputs)


if __name__ == "__main__":  # the checkpoint writer's worker processes import this file again
    main()
