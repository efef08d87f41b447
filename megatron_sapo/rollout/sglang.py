"""Launching SGLang servers for a layout: the command lines, and the processes of one node.

A server is ``python -m sglang.launch_server`` (through :mod:`~megatron_sapo.rollout.sglang_entry`, which adds the
run's API key) over ``tp_size × dp_size`` GPUs (``--tp-size``, ``--dp-size``;
``--ep-size`` splits the experts over the TP ranks, as SGLang puts EP inside TP). The cluster's
``num_nodes × gpus_per_node`` GPUs hold as many servers as fit:

- a server within one node: node ``i`` runs ``gpus_per_node / gpus`` of them, server ``j`` of the node on GPUs
  from ``--base-gpu-id j × gpus`` and HTTP port ``port + j``;
- a server across nodes: each of its ``m`` nodes runs one process with ``--nnodes m --node-rank r
  --dist-init-addr <first node>:<port + 1000 + server>``; the first node's process serves HTTP.

Flags are SGLang's ``server_args.py`` names (``--model-path``, ``--host``, ``--port``, ``--tp-size``, ``--ep-size``,
``--dp-size``, ``--mem-fraction-static``, ``--base-gpu-id``, ``--nnodes``, ``--node-rank``, ``--dist-init-addr``,
``--enable-memory-saver``, ``--enable-deterministic-inference``, ``--enable-return-routed-experts``;
``tests/test_sglang_conformance.py`` checks them against the pinned release). Server ``s``'s TP rank ``t`` sits on
the GPU of trainer rank ``s × tp_size + t``, which is what colocated weight sync (``weight_sync=tensor``) relies on.
The trainer's rank 0 launches node 0's processes (:class:`~megatron_sapo.rollout.engine.RolloutEngine`); on more
nodes, each node's first trainer process calls :func:`launch_node`, and rank 0 waits for all of them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from megatron_sapo.errors import InputError
from megatron_sapo.rollout.auth import API_KEY_ENV
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.rollout.process import ServerProcess, server_env

DIST_INIT_PORT_OFFSET = 1000  # multi-node servers rendezvous on port + this + server index
SGLANG_ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_entry.py")


@dataclass
class ServerLaunch:
    server: int  # index of the SGLang server this process belongs to
    node: int  # node rank that runs the process
    url: str | None  # the server's HTTP address, on the process that serves it; None on its other nodes
    argv: list[str]


def gpus_per_server(config: RolloutConfig) -> int:
    return config.tp_size * config.dp_size


def validate_layout(config: RolloutConfig) -> None:
    """One InputError line per layout problem, before anything is launched."""
    tp, ep = config.tp_size, config.ep_size
    if tp % ep:
        raise InputError(f"rollout.ep_size={ep} does not divide rollout.tp_size={tp}: SGLang splits the experts over "
                         "the tensor-parallel GPUs; use an ep_size that divides tp_size")  # fmt: skip
    gpus, per_node, nodes = gpus_per_server(config), config.gpus_per_node, config.num_nodes
    if gpus <= per_node and per_node % gpus:
        raise InputError(f"rollout.tp_size × rollout.dp_size = {gpus} GPUs per server does not divide "
                         f"rollout.gpus_per_node={per_node}; choose sizes whose product divides it")  # fmt: skip
    if gpus > per_node and (gpus % per_node or nodes % (gpus // per_node)):
        raise InputError(f"rollout.tp_size × rollout.dp_size = {gpus} GPUs per server spans nodes, so it must be a "
                         f"multiple of rollout.gpus_per_node={per_node} that divides rollout.num_nodes={nodes} "
                         "whole nodes")  # fmt: skip
    if nodes > 1 and len(config.node_hosts) != nodes:
        raise InputError(f"rollout.node_hosts lists {len(config.node_hosts)} address(es) for rollout.num_nodes="
                         f"{nodes}; give one address per node, in node-rank order")  # fmt: skip
    if nodes > 1 and config.host in ("127.0.0.1", "localhost"):
        raise InputError(f"rollout.host={config.host} binds loopback only, which other nodes cannot reach; set "
                         "rollout.host=0.0.0.0 when rollout.num_nodes > 1")  # fmt: skip
    if nodes > 1 and config.port == 0:
        raise InputError(
            "rollout.port=0 picks free ports on this node only; set a base port when rollout.num_nodes > 1"
        )


def sglang_command(config: RolloutConfig, model_path: str, *, port: int, base_gpu_id: int = 0, nnodes: int = 1,
                   node_rank: int = 0, dist_init_addr: str | None = None,
                   python: str = sys.executable) -> list[str]:  # fmt: skip
    """``python sglang_entry.py ...`` (``python -m sglang.launch_server ...`` with the run's API key from the
    environment) for one process of one server."""
    argv = [
        python, SGLANG_ENTRY,
        "--model-path", model_path,
        "--host", config.host,
        "--port", str(port),
        "--tp-size", str(config.tp_size),
        "--mem-fraction-static", str(config.mem_fraction_static),
        "--base-gpu-id", str(base_gpu_id),
    ]  # fmt: skip
    if config.ep_size > 1:
        argv += ["--ep-size", str(config.ep_size)]
    if config.dp_size > 1:
        argv += ["--dp-size", str(config.dp_size)]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--dist-init-addr", dist_init_addr]
    if config.enable_memory_saver:
        argv.append("--enable-memory-saver")
    if config.deterministic_inference:
        argv.append("--enable-deterministic-inference")
    if config.enable_return_routed_experts:
        argv.append("--enable-return-routed-experts")
    return argv + list(config.extra_server_args)


def plan_servers(config: RolloutConfig, model_path: str, *, ports: list[int] | None = None) -> list[ServerLaunch]:
    """Every process of every server, for the whole cluster. ``ports``: HTTP port of server j of a node (default
    ``config.port + j``)."""
    validate_layout(config)
    python = config.sglang_python or sys.executable
    hosts = config.node_hosts or ["127.0.0.1"]
    gpus, per_node = gpus_per_server(config), config.gpus_per_node
    launches = []
    if gpus <= per_node:
        local = per_node // gpus
        ports = ports or [config.port + j for j in range(local)]
        for node in range(config.num_nodes):
            for j in range(local):
                argv = sglang_command(config, model_path, port=ports[j], base_gpu_id=j * gpus, python=python)
                launches.append(ServerLaunch(node * local + j, node, f"http://{hosts[node]}:{ports[j]}", argv))
    else:
        span = gpus // per_node
        port = ports[0] if ports else config.port
        for server in range(config.num_nodes // span):
            first = server * span
            dist_init = f"{hosts[first]}:{port + DIST_INIT_PORT_OFFSET + server}"
            for rank in range(span):
                argv = sglang_command(config, model_path, port=port, nnodes=span, node_rank=rank,
                                      dist_init_addr=dist_init, python=python)  # fmt: skip
                url = f"http://{hosts[first]}:{port}" if rank == 0 else None
                launches.append(ServerLaunch(server, first + rank, url, argv))
    return launches


def server_urls(launches: list[ServerLaunch]) -> list[str]:
    return [launch.url for launch in launches if launch.url is not None]


def launch_node(config: RolloutConfig, model_path: str, node_rank: int, log_dir: str, *,
                ports: list[int] | None = None, api_key: str | None = None) -> list[ServerProcess]:  # fmt: skip
    """Start this node's SGLang processes (not waiting for them); returns them for ``stop()``. ``api_key``: the
    run's (:mod:`megatron_sapo.rollout.auth`; the same on every node), given to SGLang through the environment."""
    env = server_env(**{API_KEY_ENV: api_key} if api_key else {})
    processes = []
    for launch in plan_servers(config, model_path, ports=ports):
        if launch.node != node_rank:
            continue
        log = os.path.join(log_dir, f"sglang-server{launch.server}-node{launch.node}.log")
        processes.append(ServerProcess(launch.argv, url=launch.url, log_path=log, env=env).start())
    return processes
