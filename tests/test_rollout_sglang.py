"""The SGLang side: launcher command lines for layouts, the launcher's process lifecycle, and the client's request
and reply shapes against SGLang's (``python/sglang/srt/managers/io_struct.py``, ``sampling_params.py``,
``entrypoints/http_server.py``)."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from megatron_sapo.errors import InputError
from megatron_sapo.rollout.client import (
    RolloutClient,
    RolloutError,
    SamplingParams,
    generate_payload,
    parse_generate_response,
)
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.rollout.process import http_status, server_env, wait_until_serving
from megatron_sapo.rollout.sglang import SGLANG_ENTRY, launch_node, plan_servers, server_urls
from megatron_sapo.rollout.weight_sync import resolve_weight_sync

PY = sys.executable

# Field names of SGLang's request structs (io_struct.py) that the client may send.
GENERATE_REQ_FIELDS = {"input_ids", "text", "sampling_params", "return_logprob", "logprob_start_len",
                       "top_logprobs_num", "stream", "rid"}  # fmt: skip
SAMPLING_PARAM_KEYS = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                       "n", "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed"}  # fmt: skip
INIT_GROUP_FIELDS = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
UPDATE_DIST_FIELDS = {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests",
                      "weight_version", "load_format"}  # fmt: skip
UPDATE_DISK_FIELDS = {"model_path", "load_format", "abort_all_requests", "weight_version", "flush_cache"}


class StubServer:
    """An HTTP server on 127.0.0.1 in a thread; ``respond(path, body, count)`` returns (status, json or text)."""

    def __init__(self, respond):
        from aiohttp import web

        self.respond = respond
        self.requests: list[tuple[str, str, object]] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()

        async def handle(request):
            body = await request.json() if request.can_read_body else None
            self.requests.append((request.method, request.path, body))
            self.authorizations.append(request.headers.get("Authorization"))
            status, reply = self.respond(request.path, body, len(self.requests))
            if isinstance(reply, str):
                return web.Response(status=status, text=reply)
            return web.json_response(reply, status=status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def sglang_reply(output_ids, logprobs, finish=None, with_text=False):
    """A /generate reply as SGLang writes it (tokenizer_manager: text, output_ids, meta_info)."""
    finish = finish or {"type": "length", "length": len(output_ids)}
    return {
        "text": "decoded text",
        "output_ids": list(output_ids),
        "meta_info": {
            "id": "0b1c", "finish_reason": finish, "prompt_tokens": 3, "weight_version": "default",
            "completion_tokens": len(output_ids), "cached_tokens": 0, "e2e_latency": 0.01,
            "output_token_logprobs": [[lp, t, "x" if with_text else None]
                                      for lp, t in zip(logprobs, output_ids, strict=True)],
        },
    }  # fmt: skip


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


# --- command lines -------------------------------------------------------------------------------------------------


def test_single_node_layout_two_servers_with_their_own_gpus_and_ports():
    config = RolloutConfig(backend="sglang", tp_size=4, ep_size=4, mem_fraction_static=0.7, gpus_per_node=8,
                           port=30000, weight_sync="disk")  # fmt: skip
    launches = plan_servers(config, "/ckpt/qwen3")
    assert [(launch.server, launch.node, launch.url) for launch in launches] == [
        (0, 0, "http://127.0.0.1:30000"),
        (1, 0, "http://127.0.0.1:30001"),
    ]
    assert launches[1].argv == [
        PY, SGLANG_ENTRY, "--model-path", "/ckpt/qwen3", "--host", "127.0.0.1", "--port", "30001",
        "--tp-size", "4", "--mem-fraction-static", "0.7", "--base-gpu-id", "4", "--ep-size", "4",
    ]  # fmt: skip
    assert launches[0].argv[launches[0].argv.index("--base-gpu-id") + 1] == "0"


def test_multi_node_layouts():
    # One 8-GPU server per node: a server on each host.
    config = RolloutConfig(backend="sglang", tp_size=8, ep_size=8, num_nodes=2, gpus_per_node=8, port=30000,
                           host="0.0.0.0", node_hosts=["10.0.0.1", "10.0.0.2"])  # fmt: skip
    launches = plan_servers(config, "/ckpt")
    assert [(x.node, x.url) for x in launches] == [(0, "http://10.0.0.1:30000"), (1, "http://10.0.0.2:30000")]
    assert "--nnodes" not in launches[1].argv and "--host" in launches[1].argv

    # One 16-GPU server over two nodes: both processes rendezvous at the first node, only it serves HTTP.
    config = RolloutConfig(backend="sglang", tp_size=16, ep_size=16, num_nodes=4, gpus_per_node=8, port=30000,
                           host="0.0.0.0", node_hosts=["h0", "h1", "h2", "h3"], enable_memory_saver=True,
                           deterministic_inference=True, extra_server_args=["--disable-radix-cache"])  # fmt: skip
    launches = plan_servers(config, "/ckpt")
    assert [(x.server, x.node, x.url) for x in launches] == [
        (0, 0, "http://h0:30000"), (0, 1, None), (1, 2, "http://h2:30000"), (1, 3, None),
    ]  # fmt: skip
    assert server_urls(launches) == ["http://h0:30000", "http://h2:30000"]
    argv = launches[3].argv
    tail = argv[argv.index("--base-gpu-id") :]
    assert tail == ["--base-gpu-id", "0", "--ep-size", "16", "--nnodes", "2", "--node-rank", "1",
                    "--dist-init-addr", "h2:31001", "--enable-memory-saver", "--enable-deterministic-inference",
                    "--disable-radix-cache"]  # fmt: skip


def test_sglang_interpreter_and_data_parallel_flags():
    config = RolloutConfig(backend="sglang", tp_size=2, dp_size=2, gpus_per_node=4, port=31000, weight_sync="disk",
                           sglang_python="/opt/sglang/bin/python")  # fmt: skip
    (launch,) = plan_servers(config, "/ckpt")
    assert launch.argv[:2] == ["/opt/sglang/bin/python", SGLANG_ENTRY]
    assert launch.argv[launch.argv.index("--dp-size") + 1] == "2" and "--ep-size" not in launch.argv


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tp_size=4, ep_size=3), r"rollout.ep_size=3 does not divide rollout.tp_size=4"),
        (dict(tp_size=3, gpus_per_node=8), r"= 3 GPUs per server does not divide rollout.gpus_per_node=8"),
        (dict(tp_size=16, gpus_per_node=8, num_nodes=3, host="0.0.0.0", port=1, node_hosts=["a", "b", "c"]),
         r"spans nodes"),
        (dict(tp_size=8, num_nodes=2, host="0.0.0.0", port=1), r"rollout.node_hosts lists 0 address"),
        (dict(num_nodes=2, node_hosts=["a", "b"], port=1), r"rollout.host=127.0.0.1 binds loopback"),
        (dict(num_nodes=2, node_hosts=["a", "b"], host="0.0.0.0"), r"rollout.port=0 picks free ports"),
    ],
)  # fmt: skip
def test_bad_layouts_are_one_line_input_errors(fields, message):
    config = RolloutConfig(backend="sglang", **fields)
    with pytest.raises(InputError, match=message) as error:
        plan_servers(config, "/ckpt")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(backend="vllm"), r"rollout.backend='vllm': use one of embedded, sglang, external"),
        (dict(backend="external"), r"rollout.backend=external needs rollout.urls"),
        (dict(backend="external", router_url="http://r:1", weight_sync="distributed"),
         r"weight_sync=distributed needs rollout.urls"),
        (dict(urls=["10.0.0.1:30000"]), r"rollout.urls: '10.0.0.1:30000' is not an http\(s\) URL"),
        (dict(top_p=0.0), r"rollout.top_p=0.0: must be in \(0, 1\]"),
        (dict(weight_sync="nfs"), r"rollout.weight_sync='nfs': use one of auto, tensor, distributed, disk"),
        (dict(mem_fraction_static=1.5), r"rollout.mem_fraction_static=1.5"),
    ],
)  # fmt: skip
def test_bad_config_is_an_input_error_naming_the_field(fields, message):
    with pytest.raises(InputError, match=message):
        RolloutConfig(**fields)


# --- which weight sync a layout gets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, trainer_ranks, ranks, servers, mode",
    [
        # The 30B recipe: 8 trainer ranks on 8 GPUs, two TP-4 servers on the same GPUs: colocated.
        (dict(backend="sglang", tp_size=4, ep_size=4), 8, [4, 4], None, "tensor"),
        # 4 nodes x 8 GPUs, eight TP-4 servers (config_multinode.yaml).
        (dict(backend="sglang", tp_size=4, num_nodes=4), 32, [4] * 8, None, "tensor"),
        # The demo: 2 trainer ranks, the embedded server standing in for one TP-2 server.
        (dict(backend="embedded", tp_size=2), 2, [2], None, "tensor"),
        (dict(backend="embedded"), 2, [1], None, "distributed"),  # fewer server ranks: a gloo broadcast
        (dict(backend="sglang", tp_size=2, dp_size=2), 8, [4, 4], None, "disk"),  # replicas: neither
        (dict(backend="sglang", tp_size=4), 4, [4, 4], None, "disk"),  # not one server rank per trainer rank
        (dict(backend="external", urls=["http://a:1", "http://b:1"]), 8, [4, 4], [{"dp_size": 1}] * 2, "distributed"),
        (dict(backend="external", urls=["http://a:1"]), 8, [2], [{"dp_size": 1, "pp_size": 2}], "disk"),
        (dict(backend="external", router_url="http://r:1", weight_sync="disk"), 8, [], None, "disk"),
        (dict(backend="external", urls=["http://a:1"], weight_sync="tensor"), 4, [4], [{"dp_size": 1}], "tensor"),
    ],
)  # fmt: skip
def test_auto_weight_sync_follows_the_layout(fields, trainer_ranks, ranks, servers, mode):
    config = RolloutConfig(**{"weight_sync": "auto", **fields})
    assert resolve_weight_sync(config, trainer_ranks=trainer_ranks, ranks_per_server=ranks, servers=servers) == mode


@pytest.mark.parametrize(
    "fields, trainer_ranks, ranks, servers, message",
    [
        (dict(backend="sglang", tp_size=4, weight_sync="distributed"), 8, [4, 4], None,
         r"rollout.weight_sync=distributed with rollout.backend=sglang: the launched servers share the trainer's "
         r"GPUs .* NCCL refuses two ranks of one communicator on one GPU; use weight_sync=tensor"),
        (dict(backend="sglang", tp_size=4, weight_sync="tensor"), 4, [4, 4], None,
         r"rollout.weight_sync=tensor hands trainer rank r's tensors to server rank r on its device, but 4 trainer "
         r"rank\(s\) face 8 server rank\(s\)"),
        (dict(backend="sglang", tp_size=2, dp_size=2, weight_sync="tensor"), 8, [4, 4], None,
         r"a server runs dp_size=2 data-parallel replicas, and SGLang 0.5.23 loads tensors and broadcasts only with "
         r"dp_size=1"),
        (dict(backend="external", urls=["http://a:1"], weight_sync="distributed"), 8, [4], [{"dp_size": 2}],
         r"rollout.weight_sync=distributed: a server runs dp_size=2"),
        (dict(backend="external", urls=["http://a:1"], weight_sync="distributed"), 8, [4], [{"pp_size": 2}],
         r"pp_size=2, and SGLang numbers the update ranks by TP rank only"),
        (dict(backend="embedded", tp_size=2, weight_sync="distributed"), 2, [2], None,
         r"the embedded server joins the update group as one rank, so it needs rollout.tp_size=1"),
    ],
)  # fmt: skip
def test_impossible_weight_sync_is_one_line(fields, trainer_ranks, ranks, servers, message):
    config = RolloutConfig(**fields)
    with pytest.raises(InputError, match=message) as error:
        resolve_weight_sync(config, trainer_ranks=trainer_ranks, ranks_per_server=ranks, servers=servers)
    assert "\n" not in str(error.value)


def test_an_impossible_weight_sync_stops_the_config_before_any_work(tiny_hf_dir):
    """The demo recipe with a broadcast group: its embedded TP-2 server cannot join one as two ranks."""
    import os

    from megatron_sapo.config import load_config

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny_moe", "config.yaml")
    config = load_config(recipe, [], world_size=2, check_paths=False, hf_config_dir=tiny_hf_dir)
    assert (config.rollout.weight_sync, config.rollout.tp_size) == ("auto", 2)
    with pytest.raises(InputError, match=r"^rollout.weight_sync=distributed: the embedded server joins the update "
                                         r"group as one rank, so it needs rollout.tp_size=1 \(got 2\)"):  # fmt: skip
        load_config(recipe, ["rollout.weight_sync=distributed"], world_size=2, check_paths=False,
                    hf_config_dir=tiny_hf_dir)  # fmt: skip


def test_servers_environment_drops_expandable_segments(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    cases = [
        ("expandable_segments:True", None),
        ("max_split_size_mb:64, expandable_segments:True", "max_split_size_mb:64"),
        ("garbage_collection_threshold:0.6", "garbage_collection_threshold:0.6"),
    ]
    for value, kept in cases:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", value)
        monkeypatch.setenv("PYTORCH_ALLOC_CONF", value)
        env = server_env(OMP_NUM_THREADS="1")
        assert env.get("PYTORCH_CUDA_ALLOC_CONF") == kept and env.get("PYTORCH_ALLOC_CONF") == kept
        assert "RANK" not in env and env["OMP_NUM_THREADS"] == "1"
    assert __import__("os").environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"  # trainer's own


# --- the launcher's processes --------------------------------------------------------------------------------------

FAKE_SGLANG = """#!{python}
# Stands in for an interpreter with sglang: runs the launcher's entry file with a fake "sglang" package first on
# the path (FAKE_LAUNCH_SERVER), so the entry file's key handling and output redaction run for real.
import os, sys
assert sys.argv[1] == {entry!r}, sys.argv
env = dict(os.environ, PYTHONPATH={site!r} + os.pathsep + os.environ.get("PYTHONPATH", ""))
os.execve({python!r}, [{python!r}, *sys.argv[1:]], env)
"""

FAKE_LAUNCH_SERVER = """
# sglang.launch_server as far as the launcher can tell: takes SGLang's flags, records its command line and
# environment, logs its server arguments with the API key in them (as SGLang 0.5.23 does), and serves through the
# embedded server (with the same --model-path/--host/--port/--api-key).
import argparse, json, os, subprocess, sys
parser = argparse.ArgumentParser()
for flag in ("--model-path", "--host", "--port", "--tp-size", "--base-gpu-id", "--mem-fraction-static", "--api-key"):
    parser.add_argument(flag)
args, _ = parser.parse_known_args(sys.argv[1:])
record = {{"argv": sys.argv, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
          "key_in_env": "MEGATRON_SAPO_ROLLOUT_API_KEY" in os.environ}}
with open(os.path.join({record!r}, "launch-" + args.port), "w") as f:
    json.dump(record, f)
print(f"server_args=ServerArgs(model_path={{args.model_path!r}}, api_key={{args.api_key!r}})", flush=True)
command = [{python!r}, "-m", "megatron_sapo.rollout.server", "--model-path", args.model_path, "--host", args.host,
           "--port", args.port, "--log-level", "warning"] + (["--api-key", args.api_key] if args.api_key else [])
sys.exit(subprocess.call(command))
"""


def fake_sglang_python(tmp_path) -> str:
    site = tmp_path / "fake-sglang-site"
    (site / "sglang").mkdir(parents=True)
    (site / "sglang" / "__init__.py").write_text("")
    (site / "sglang" / "launch_server.py").write_text(FAKE_LAUNCH_SERVER.format(python=PY, record=str(tmp_path)))
    path = tmp_path / "python-with-sglang"
    path.write_text(FAKE_SGLANG.format(python=PY, entry=SGLANG_ENTRY, site=str(site)))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_sglang_backend_launches_every_server_and_syncs_them_all_in_one_group(tiny_hf_dir, tmp_path, monkeypatch):
    """The engine's sglang backend end to end, with the embedded server standing in for sglang: two servers on
    "GPUs" 0 and 1, health waited for, generation spread over both, one broadcast group of 3 ranks (trainer at 0,
    servers at rank_offset 1 and 2), and a clean stop. The servers' environment has the trainer's allocator settings
    without expandable_segments (torch_memory_saver refuses to start with it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_sapo.rollout import RolloutEngine
    from megatron_sapo.rollout.hf_weights import iter_safetensors

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    prompt = [1, 30, 31, 32, 33]
    greedy = lambda m: m.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,  # noqa: E731
                                  pad_token_id=3)[0, len(prompt) :].tolist()  # fmt: skip
    original = greedy(model)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.1)
    model.save_pretrained(tmp_path / "scaled")
    scaled = greedy(model)
    assert scaled != original

    config = RolloutConfig(backend="sglang", tp_size=1, gpus_per_node=2, sglang_python=fake_sglang_python(tmp_path),
                           weight_sync="distributed", dist_backend="gloo", bucket_size_mb=0.1,
                           max_new_tokens=8)  # fmt: skip
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:64")
    engine = RolloutEngine(config, model_path=tiny_hf_dir, log_dir=str(tmp_path / "logs"))
    try:
        assert len(engine.urls) == 2 and engine.ranks_per_server == [1, 1]
        assert engine.weight_sync_mode == "distributed"
        key = engine.api_key
        assert key and len(key) >= 32
        for index, (url, server) in enumerate(zip(engine.urls, engine.processes)):
            with open(tmp_path / f"launch-{url.rsplit(':', 1)[1]}") as f:
                launched = json.load(f)
            argv = launched["argv"]
            assert argv[argv.index("--base-gpu-id") + 1] == str(index) and argv[argv.index("--tp-size") + 1] == "1"
            assert launched["alloc_conf"] == "max_split_size_mb:64"
            # SGLang got the key as --api-key, which neither its environment nor any command line shows.
            assert argv[argv.index("--api-key") + 1] == key and not launched["key_in_env"]
            assert key not in open(f"/proc/{server.process.pid}/cmdline").read()
            log = open(server.log_path).read()
            assert "api_key='***'" in log and key not in log, log[-2000:]
        params = engine.sampling_params(temperature=0.0, ignore_eos=True)
        assert [g[0].response_ids for g in engine.generate([prompt] * 4, n=1, sampling=params)] == [original] * 4

        stats = engine.update_weights(iter_safetensors(str(tmp_path / "scaled")))
        assert stats.tensors == 87 and stats.buckets > 1
        assert engine._sync.group.size() == 3
        assert [g[0].response_ids for g in engine.generate([prompt] * 4, n=1, sampling=params)] == [scaled] * 4
        for url in engine.urls:  # each server on its own: only with the run's key
            body = json.dumps({"input_ids": prompt, "sampling_params": params.to_sglang()}).encode()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url + "/generate", data=body), timeout=60)
            assert refused.value.code == 401 and json.loads(refused.value.read()) == {"error": "Unauthorized"}
            request = urllib.request.Request(url + "/generate", data=body, headers={"Authorization": f"Bearer {key}"})
            assert json.loads(urllib.request.urlopen(request, timeout=60).read())["output_ids"] == scaled
        processes, urls = list(engine.processes), list(engine.urls)
    finally:
        engine.shutdown()
    assert len(processes) == 2 and all(not p.alive for p in processes)
    assert all(not isinstance(http_status(url + "/health", 2), int) for url in urls)


def test_launcher_reports_a_server_that_dies_while_starting(tmp_path):
    bad = tmp_path / "not-a-checkpoint"
    bad.mkdir()
    (bad / "config.json").write_text("{ this is not json")
    config = RolloutConfig(backend="sglang", tp_size=1, gpus_per_node=1, sglang_python=fake_sglang_python(tmp_path))
    processes = launch_node(config, str(bad), node_rank=0, log_dir=str(tmp_path / "logs"), ports=free_ports(1))
    start = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"exited with status \d+ while starting.*last log lines"):
            wait_until_serving(processes, timeout_s=120)
    finally:
        processes[0].stop()
    assert time.monotonic() - start < 60


def test_launcher_gives_up_on_a_server_that_never_serves(tmp_path):
    from megatron_sapo.rollout.process import ServerProcess

    port = free_ports(1)[0]
    sleeper = ServerProcess([PY, "-c", "import time; time.sleep(60)"], url=f"http://127.0.0.1:{port}",
                            log_path=str(tmp_path / "sleeper.log")).start()  # fmt: skip
    start = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"not serving after 2s \(http://127.0.0.1:\d+: ConnectionRefused"):
            wait_until_serving([sleeper], timeout_s=2)
    finally:
        sleeper.stop(grace_s=2)
    assert time.monotonic() - start < 6 and not sleeper.alive


# --- request and reply shapes --------------------------------------------------------------------------------------


def test_generate_request_is_sglangs_generate_req_input():
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=33, stop_token_ids=[9, 5, 9],
                              seed=42)  # fmt: skip
    payload = generate_payload([1, 2, 3], sampling)
    assert payload == {
        "input_ids": [1, 2, 3],
        "sampling_params": {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 33,
                            "stop_token_ids": [5, 9], "sampling_seed": 42},
        "return_logprob": True,
    }  # fmt: skip
    assert set(payload) <= GENERATE_REQ_FIELDS and set(payload["sampling_params"]) <= SAMPLING_PARAM_KEYS
    greedy = generate_payload([1], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    assert greedy["sampling_params"] == {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 4,
                                         "ignore_eos": True}  # fmt: skip


def test_admin_requests_carry_sglangs_fields():
    def respond(path, body, count):
        if path == "/release_memory_occupation" or path == "/resume_memory_occupation":
            return 200, None
        return 200, {"success": True, "message": "ok"}

    stub = StubServer(respond)
    client = RolloutClient([stub.url], max_retries=0)

    async def calls():
        await client.init_weights_update_group(stub.url, master_address="10.1.2.3", master_port=29555,
                                               rank_offset=1, world_size=3, group_name="weight_update_group",
                                               backend="nccl")  # fmt: skip
        await client.update_weights_from_distributed(stub.url, names=["a.weight"], dtypes=["bfloat16"], shapes=[[2, 3]],
                                                     group_name="weight_update_group", weight_version="7")  # fmt: skip
        await client.update_weights_from_disk(stub.url, "/ckpt/step7", weight_version="7")
        await client.release_memory_occupation(stub.url, ["weights"])
        await client.resume_memory_occupation(stub.url)
        await client.begin_weight_update(stub.url)
        await client.update_weights_from_tensor(stub.url, ["cGF5bG9hZA=="], weight_version="8")
        await client.end_weight_update(stub.url)
        await client.server_info(stub.url)
        await client.model_info(stub.url)
        await client.close()

    try:
        run(calls())
    finally:
        stub.close()
    (_, init_path, init), (_, dist_path, dist), (_, disk_path, disk), (_, rel_path, rel), (_, res_path, res) = (
        stub.requests[:5]
    )
    assert [(method, path, body) for method, path, body in stub.requests[5:]] == [
        ("POST", "/begin_weight_update", {}),
        ("POST", "/update_weights_from_tensor",
         {"serialized_named_tensors": ["cGF5bG9hZA=="], "flush_cache": True, "weight_version": "8"}),
        ("POST", "/end_weight_update", {}),
        ("GET", "/server_info", None),
        ("GET", "/model_info", None),
    ]  # fmt: skip
    assert init_path == "/init_weights_update_group" and set(init) == INIT_GROUP_FIELDS
    assert init == {"master_address": "10.1.2.3", "master_port": 29555, "rank_offset": 1, "world_size": 3,
                    "group_name": "weight_update_group", "backend": "nccl"}  # fmt: skip
    assert dist_path == "/update_weights_from_distributed" and set(dist) <= UPDATE_DIST_FIELDS
    assert dist["names"] == ["a.weight"] and dist["dtypes"] == ["bfloat16"] and dist["shapes"] == [[2, 3]]
    assert disk_path == "/update_weights_from_disk" and set(disk) <= UPDATE_DISK_FIELDS
    assert disk["model_path"] == "/ckpt/step7" and disk["weight_version"] == "7"
    assert (rel_path, rel, res_path, res) == ("/release_memory_occupation", {"tags": ["weights"]},
                                              "/resume_memory_occupation", {"tags": None})  # fmt: skip


def test_sglang_reply_is_parsed_into_a_sample():
    reply = sglang_reply([17, 4, 5], [-0.5, -1.25, -0.125], {"type": "stop", "matched": 5}, with_text=True)
    sample = parse_generate_response(reply, [1, 2, 3])
    assert sample.prompt_ids == [1, 2, 3] and sample.response_ids == [17, 4, 5]
    assert sample.logprobs == [-0.5, -1.25, -0.125]
    assert (sample.finish_reason, sample.matched_stop, sample.weight_version) == ("stop", 5, "default")
    length = parse_generate_response(sglang_reply([8], [-2.0]), [1])
    assert (length.finish_reason, length.matched_stop) == ("length", None)

    broken = sglang_reply([17, 4], [-0.5, -1.0])
    broken["output_ids"] = [17, 5]
    with pytest.raises(RolloutError, match="disagree"):
        parse_generate_response(broken, [1])
    del broken["meta_info"]["output_token_logprobs"]
    with pytest.raises(RolloutError, match="no meta_info.output_token_logprobs"):
        parse_generate_response(broken, [1])
    with pytest.raises(RolloutError, match="not SGLang's"):
        parse_generate_response({"error": "x"}, [1])


def test_client_spreads_requests_round_robin():
    counts = {}

    def make(name):
        def respond(path, body, count):
            counts[name] = counts.get(name, 0) + 1
            return 200, sglang_reply([7], [-1.0])

        return respond

    stubs = [StubServer(make("a")), StubServer(make("b"))]
    client = RolloutClient([s.url for s in stubs], max_retries=0)
    try:
        groups = run(_generate_and_close(client, [[1], [2]], n=3))
    finally:
        for s in stubs:
            s.close()
    assert [len(g) for g in groups] == [3, 3] and counts == {"a": 3, "b": 3}
    seeds = [body["sampling_params"]["sampling_seed"] for s in stubs for (_, _, body) in s.requests]
    assert len(set(seeds)) == 6  # every sample its own seed


async def _generate_and_close(client, prompts, n, seed=5):
    try:
        return await client.generate_groups(prompts, n, SamplingParams(max_new_tokens=1), seed=seed)
    finally:
        await client.close()
