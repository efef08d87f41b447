"""Entry point: ``torchrun --nproc_per_node=N -m megatron_sapo.train --config FILE.yaml [key=value ...]``.

The whole configuration is read and validated before any process group or model is built; a bad config ends
with one ``error: <key>: <what and how to fix>`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_sapo.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_sapo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", required=True, help="YAML config, e.g. recipes/tiny_moe/config.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. actor.tau_neg=1.05")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("megatron_sapo").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        from megatron_sapo.config import load_config

        config = load_config(args.config, args.overrides)
    except InputError as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2

    from megatron_sapo.parallel.state import destroy
    from megatron_sapo.trainer import train

    try:
        out = train(config)
    except InputError as error:  # found after start-up, e.g. a checkpoint that does not fit the model
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        destroy()
    if rank == 0:
        print(f"done: metrics in {os.path.join(out, 'metrics.jsonl')}, final policy in {os.path.join(out, 'hf')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
