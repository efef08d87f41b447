"""The ``megatron-sapo`` command: ``megatron-sapo plan ...`` and ``megatron-sapo train ...``.

    megatron-sapo plan --config recipes/qwen3_30b_a3b/config.yaml --nodes 1 --gpus-per-node 8
    torchrun --nproc_per_node=8 --no-python megatron-sapo train --config recipes/qwen3_30b_a3b/config.yaml

``plan`` prints the per-GPU memory plan (exit 0: fits, 1: does not, 2: bad input); ``train`` is
``python -m megatron_sapo.train`` (one process per GPU under torchrun). Each subcommand takes its own ``--help``.
"""

from __future__ import annotations

import sys

USAGE = "usage: megatron-sapo {plan,train} [--help] ARGS...\n\n" + __doc__.split("\n\n", 1)[1]


def _plan(argv: list[str]) -> int:
    from megatron_sapo.plan import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from megatron_sapo.train import main  # torch and megatron load only when training

    return main(argv)


COMMANDS = {"plan": _plan, "train": _train}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}; use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
