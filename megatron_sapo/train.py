"""Entry point: ``torchrun --nproc_per_node=N -m megatron_sapo.train [--config FILE.yaml] [key=value ...]``.

A verl command line runs with its program swapped: ``python3 -m verl.trainer.main_ppo --config-name=ppo_megatron_trainer
actor_rollout_ref.actor.tau_neg=1.05 ...`` → ``torchrun ... -m megatron_sapo.train --config-name=ppo_megatron_trainer
actor_rollout_ref.actor.tau_neg=1.05 ...`` (the ``actor_rollout_ref.`` prefix is dropped; see config.py).

The whole configuration, the tokenizer and the prompt data are read and checked before any process group or model
is built; bad input ends with one ``error: <key>: <what and how to fix>`` line and exit status 2. A run that fails
later for a reason outside the code (a dead rollout server, a full disk) ends with one ``error:`` line from rank 0
and exit status 1. Under torchrun, torchrun adds its own summary of the failed ranks after that line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from megatron_sapo.errors import InputError, RunError
from megatron_sapo.lifetime import reap_when_gone


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron_sapo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML config, e.g. recipes/tiny_moe/config.yaml (default: the built-in "
                        "defaults, megatron_sapo/config.py)")  # fmt: skip
    source.add_argument("--config-name", choices=VERL_CONFIG_NAMES,
                        help="verl's config names, accepted so that a verl command line runs as written: both mean "
                        "the built-in defaults (this trainer is Megatron's)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. actor.tau_neg=1.05")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("megatron_sapo").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        from megatron_sapo.config import load_config

        config = load_config(args.config, args.overrides)
    except InputError as error:
        return _report(error, rank)

    reap_when_gone()
    try:
        data = _load_data_on_rank0(config, rank)
    except InputError as error:
        return _report(error, rank)

    from megatron_sapo.parallel.state import destroy
    from megatron_sapo.trainer import train

    try:
        out = train(config, data)
    except (InputError, RunError) as error:  # a checkpoint that does not fit, a dead rollout server, a full disk
        return _report(error, rank)
    finally:
        destroy()
    if rank == 0:
        print(f"done: metrics in {os.path.join(out, 'metrics.jsonl')}, final policy in {os.path.join(out, 'hf')}")
    return 0


RANK0_HEAD_START_S = 10.0
VERL_CONFIG_NAMES = ("ppo_trainer", "ppo_megatron_trainer")


def _report(error: InputError | RunError, rank: int) -> int:
    """Rank 0 prints the one line; the others stay silent and give it a head start, so that torchrun names rank 0
    as the root cause and then ends them (see README, "When things go wrong"); a failure only one rank knows of is
    printed by that rank (:class:`RunError`'s ``only_this_rank``). Returns the exit status."""
    if rank == 0 or getattr(error, "only_this_rank", False):
        print(f"error: {error}", file=sys.stderr)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(RANK0_HEAD_START_S)
    return 2 if isinstance(error, InputError) else 1


def _load_data_on_rank0(config, rank: int):
    """Read and check the tokenizer and prompts before any process group exists: rank 0 reads them, the other ranks
    wait for its verdict on torchrun's store (and read them later, in ``train``, knowing they are good).

    Returns the data on rank 0 (None elsewhere); raises InputError on every rank when it is bad. Without torchrun's
    agent store (``world == 1``, other launchers) every rank reads for itself."""
    import datetime

    import torch.distributed as dist

    from megatron_sapo.data.prompts import load_run_data

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return load_run_data(config)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(hours=2), wait_for_workers=False)  # fmt: skip
    key = f"megatron_sapo/data_verdict/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank != 0:
        verdict = store.get(key).decode()
        if verdict != "ok":
            raise InputError(verdict)
        return None
    try:
        data = load_run_data(config)
    except InputError as error:
        store.set(key, str(error))
        raise
    except BaseException as error:
        store.set(key, f"reading the data on rank 0 failed: {type(error).__name__}: {error}")
        raise
    store.set(key, "ok")
    return data


if __name__ == "__main__":
    sys.exit(main())
