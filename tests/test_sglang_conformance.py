"""Our SGLang protocol against SGLang's own released source: the wheel of the version setup.py pins, downloaded with
``pip download --no-deps`` into a cache (``$MEGATRON_SAPO_CACHE``, default ``~/.cache/megatron_sapo``) and read as
text (nothing of it is imported). When the pin moves, each test names what no longer holds:

- every endpoint and HTTP method the client calls is a route of ``entrypoints/http_server.py``;
- every field we send is a field of the route's ``io_struct`` request class, and we send all its required ones;
- every ``/generate`` sampling key is one SGLang's schema accepts (``sglang/api/v1/api_types.py`` rejects the rest);
- every launcher flag is a server argument (``srt/arg_groups/fields/*.py``, ``server_args.py``);
- the reply fields we parse are the ones the tokenizer manager (and the finish reasons) write;
- the embedded server's weight-update session, memory tags and tensor payloads match SGLang's.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import dataclasses
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from test_rollout_sglang import StubServer, sglang_reply

from megatron_sapo.rollout.client import RolloutClient, SamplingParams, generate_payload
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.rollout.sglang import SGLANG_ENTRY, plan_servers
from megatron_sapo.rollout.weight_sync import _TensorUnpickler, pack_bucket, serialize_named_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pinned_version() -> str:
    with open(os.path.join(ROOT, "setup.py")) as f:
        match = re.search(r'"sglang==([0-9][^"]*)"', f.read())
    assert match, 'setup.py must pin one SGLang release: "sglang==X.Y.Z"'
    return match.group(1)


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    version = pinned_version()
    cache = os.path.join(os.environ.get("MEGATRON_SAPO_CACHE", os.path.expanduser("~/.cache/megatron_sapo")),
                         f"sglang-{version}")  # fmt: skip
    os.makedirs(cache, exist_ok=True)

    def cached():
        return [os.path.join(cache, n) for n in os.listdir(cache) if n.startswith(f"sglang-{version}-") and
                n.endswith(".whl")]  # fmt: skip

    if not cached():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-d", cache, f"sglang=={version}"],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 and (unreachable := registry_problem()):
            pytest.skip(f"no package registry reachable to download sglang=={version} ({unreachable})")
        assert proc.returncode == 0 and cached(), f"pip download sglang=={version} failed:\n{output[-3000:]}"
    return zipfile.ZipFile(sorted(cached())[0])


def registry_problem() -> str | None:
    """Why pip's index cannot be reached (None if it answers at all, even with an error status)."""
    import urllib.error
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL")
    if not index:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True,
                              text=True)  # fmt: skip
        index = proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "https://pypi.org/simple"
    try:
        urllib.request.urlopen(index.rstrip("/") + "/sglang/", timeout=15).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as error:
        return f"{index}: {getattr(error, 'reason', error)}"
    return None


def source(wheel: zipfile.ZipFile, path: str) -> str:
    return wheel.read(path).decode()


def tree(wheel: zipfile.ZipFile, path: str) -> ast.Module:
    # Parsed on a fresh thread: CPython 3.11.7's ast module can raise "SystemError: AST constructor recursion depth
    # mismatch" when called deep in a stack (CPython gh-106905; seen once in the full suite, never alone).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(ast.parse, source(wheel, path)).result()


def classes(module: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in module.body if isinstance(node, ast.ClassDef)}


def own_fields(cls: ast.ClassDef) -> dict[str, bool]:
    """Annotated class attributes → whether each has a default."""
    return {node.target.id: node.value is not None for node in cls.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}  # fmt: skip


def struct_fields(module: ast.Module, name: str) -> dict[str, bool]:
    """A class's fields with its in-module bases' (io_struct's request classes derive from BaseReq)."""
    table = classes(module)
    cls = table[name]
    fields: dict[str, bool] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in table:
            fields.update(struct_fields(module, base.id))
    fields.update(own_fields(cls))
    return fields


# --- what our side sends and expects ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_requests() -> list[tuple[str, str, object]]:
    """Every request the client makes, recorded by a stub server: one call of each public method."""

    def respond(path, body, count):
        if path == "/generate":
            return 200, sglang_reply([4, 5], [-0.5, -0.25], {"type": "stop", "matched": 5})
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return 200, None
        if path in ("/server_info", "/model_info"):
            return 200, {"tp_size": 1}
        return 200, {"success": True, "message": "ok", "num_paused_requests": 0}

    stub = StubServer(respond)
    client = RolloutClient([stub.url], max_retries=0, api_key=CONFORMANCE_KEY)
    everything = every_sampling_option()
    calls = {
        "generate": lambda: client.generate([1, 2, 3], everything),
        "generate_groups": lambda: client.generate_groups([[1, 2]], 2, everything),
        "generate_first_groups": lambda: client.generate_first_groups([[1, 2], [3, 4]], 2, everything, keep=1),
        "abort_requests": lambda: client.abort_requests(["osg-0-0.0."]),
        "healthy": lambda: client.healthy(stub.url),
        "flush_cache": lambda: client.flush_cache(stub.url),
        "server_info": lambda: client.server_info(stub.url),
        "model_info": lambda: client.model_info(stub.url),
        "begin_weight_update": lambda: client.begin_weight_update(stub.url),
        "end_weight_update": lambda: client.end_weight_update(stub.url),
        "update_weights_from_tensor": lambda: client.update_weights_from_tensor(stub.url, ["cGF5bG9hZA=="],
                                                                                weight_version="2"),
        "update_weights_from_disk": lambda: client.update_weights_from_disk(stub.url, "/ckpt", weight_version="2"),
        "init_weights_update_group": lambda: client.init_weights_update_group(
            stub.url, master_address="10.0.0.1", master_port=1234, rank_offset=1, world_size=3,
            group_name="weight_update_group", backend="nccl"),
        "update_weights_from_distributed": lambda: client.update_weights_from_distributed(
            stub.url, names=["w"], dtypes=["bfloat16"], shapes=[[2]], group_name="weight_update_group",
            weight_version="2"),
        "destroy_weights_update_group": lambda: client.destroy_weights_update_group(stub.url, "weight_update_group"),
        "release_memory_occupation": lambda: client.release_memory_occupation(stub.url, ["weights"]),
        "resume_memory_occupation": lambda: client.resume_memory_occupation(stub.url, ["kv_cache", "cuda_graph"]),
    }  # fmt: skip
    public = {name for name in vars(RolloutClient) if not name.startswith("_") and name not in ("request", "close")
              and asyncio.iscoroutinefunction(getattr(RolloutClient, name))}  # fmt: skip
    assert public == set(calls), f"client methods without a conformance call: {sorted(public ^ set(calls))}"

    async def run_all():
        try:
            for call in calls.values():
                await call()
        finally:
            await client.close()

    try:
        asyncio.new_event_loop().run_until_complete(run_all())
    finally:
        stub.close()
    recorded = Recorded(stub.requests)
    recorded.authorizations = stub.authorizations
    return recorded


CONFORMANCE_KEY = "conformance-key-0123456789"


class Recorded(list):
    authorizations: list


# --- API keys: srt/utils/auth.py (pure, stdlib only), the middleware in entrypoints/http_server.py ------------------


def sglang_auth(wheel):
    """The wheel's ``srt/utils/auth.py`` as a module (it imports only the standard library at its top level, as its
    docstring promises, so that its pure ``decide_request_auth`` can be run here)."""
    import types

    text = source(wheel, "sglang/srt/utils/auth.py")
    module = types.ModuleType("sglang_auth_from_the_wheel")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    try:
        exec(compile(text, "sglang/srt/utils/auth.py", "exec"), module.__dict__)  # noqa: S102
    finally:
        del sys.modules[module.__name__]
    return module, text


def test_the_api_key_rule_is_sglangs_for_every_request_we_make(wheel, client_requests):
    from megatron_sapo.rollout.auth import API_KEY_ENV, UNAUTHORIZED_BODY, UNAUTHORIZED_STATUS, allowed
    from megatron_sapo.rollout.sglang_entry import API_KEY_ENV as ENTRY_KEY_ENV

    auth, text = sglang_auth(wheel)
    paths = sorted({path for _, path, _ in client_requests} | {"/health", "/health_generate", "/ready", "/metrics",
                                                                "/v1/models", "/get_model_info"})  # fmt: skip
    headers = [None, "", f"Bearer {CONFORMANCE_KEY}", f"bearer {CONFORMANCE_KEY}", f"BEARER {CONFORMANCE_KEY}",
               f"Bearer  {CONFORMANCE_KEY}", f"Bearer {CONFORMANCE_KEY} ", "Bearer wrong", f"Basic {CONFORMANCE_KEY}",
               f"Bearer{CONFORMANCE_KEY}", CONFORMANCE_KEY, "Bearer "]  # fmt: skip
    checked = 0
    for method in ("GET", "POST", "PUT", "OPTIONS"):
        for path in paths:
            for header in headers:
                for key in (None, CONFORMANCE_KEY):
                    for level in (auth.AuthLevel.NORMAL, auth.AuthLevel.ADMIN_OPTIONAL):  # with no admin key
                        theirs = auth.decide_request_auth(method=method, path=path, authorization_header=header,
                                                          api_key=key, admin_api_key=None, auth_level=level)
                        assert allowed(method, path, header, key) == theirs.allowed, (method, path, header, key)
                        if not theirs.allowed:
                            assert theirs.error_status_code == UNAUTHORIZED_STATUS
                        checked += 1
    assert checked > 1000
    # The refusal's body, and that a server with --api-key installs the middleware.
    flat = " ".join(text.split())
    assert '"Unauthorized" if decision.error_status_code == 401' in flat and 'content={ "error": (' in flat
    assert UNAUTHORIZED_BODY == {"error": "Unauthorized"}
    server = " ".join(source(wheel, "sglang/srt/entrypoints/http_server.py").split())
    assert "add_api_key_middleware( app, api_key=get_serving().api_key," in server
    # The launcher hands the key over as --api-key, a server argument; the client sends it on every request.
    assert "--api-key" in cli_flags(wheel) and ENTRY_KEY_ENV == API_KEY_ENV
    assert '"--api-key"' in open(SGLANG_ENTRY).read() and "sglang/launch_server.py" in wheel.namelist()
    assert set(client_requests.authorizations) == {f"Bearer {CONFORMANCE_KEY}"}


def every_sampling_option() -> SamplingParams:
    """SamplingParams with every option the client can send switched on."""
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop_token_ids=[5], seed=3,
                            ignore_eos=True)  # fmt: skip
    if "return_routed_experts" in {f.name for f in dataclasses.fields(SamplingParams)}:
        params = dataclasses.replace(params, return_routed_experts=True)
    return params


def routes(wheel) -> dict[str, tuple[set[str], str | None]]:
    """http_server.py's routes: path → (methods, the request struct its handler takes)."""
    table: dict[str, tuple[set[str], str | None]] = {}
    for node in tree(wheel, "sglang/srt/entrypoints/http_server.py").body:
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        struct = None
        for arg in node.args.args:
            text = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            found = re.search(r"\b(\w+Req(?:Input)?)\b", text)
            struct = struct or (found.group(1) if found else None)
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                    and isinstance(decorator.func.value, ast.Name) and decorator.func.value.id == "app"):  # fmt: skip
                continue
            kind, args = decorator.func.attr, decorator.args
            if not args or not isinstance(args[0], ast.Constant):
                continue
            methods = {kind.upper()} if kind in ("get", "post", "put", "delete") else set()
            for keyword in decorator.keywords:
                if keyword.arg == "methods":
                    methods = {m.value for m in keyword.value.elts}
            known = table.get(args[0].value, (set(), None))
            table[args[0].value] = (known[0] | methods, known[1] or struct)
    return table


# --- the checks -------------------------------------------------------------------------------------------------


def test_every_endpoint_and_method_the_client_calls_exists(wheel, client_requests):
    table = routes(wheel)
    called = {(method, path) for method, path, _ in client_requests}
    missing = sorted(f"{method} {path}" for method, path in called if method not in table.get(path, (set(),))[0])
    assert not missing, f"SGLang {pinned_version()} has no route for {missing}"
    assert {"/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor", "/server_info",
            "/model_info"} <= {path for _, path in called}  # fmt: skip
    assert not {"/get_server_info", "/get_model_info"} & {path for _, path in called}  # deprecated in 0.5.23


def test_every_request_field_is_a_field_of_the_io_struct_class(wheel, client_requests):
    table = routes(wheel)
    io_struct = tree(wheel, "sglang/srt/managers/io_struct.py")
    problems = []
    for _, path, body in client_requests:
        if not isinstance(body, dict):
            continue
        struct = table[path][1]
        assert struct, f"{path}: its handler takes no io_struct request class"
        fields = struct_fields(io_struct, struct)
        problems += [f"{path}: {key} is not a field of {struct}" for key in body if key not in fields]
        problems += [f"{path}: {struct}.{key} is required and not sent" for key, has_default in fields.items()
                     if not has_default and key not in body]  # fmt: skip
    assert not problems, problems


def test_every_generate_sampling_key_is_accepted(wheel):
    """The API schema rejects unknown sampling keys (api_types.SamplingParams; unknown top-level keys it ignores, and
    those are checked against GenerateReqInput above); SamplingParams must know them too. The embedded server accepts
    no key SGLang would refuse."""
    from megatron_sapo.rollout.server import DEFAULT_ONLY_SAMPLING_KEYS, SUPPORTED_SAMPLING_KEYS

    schema = own_fields(classes(tree(wheel, "sglang/api/v1/api_types.py"))["SamplingParams"])
    params = own_fields(classes(tree(wheel, "sglang/srt/sampling/sampling_params.py"))["SamplingParams"])
    sent = set(generate_payload([1, 2], every_sampling_option())["sampling_params"])
    assert sent == {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed", "ignore_eos"}
    assert sent <= set(schema) and sent <= set(params), (sent - set(schema), sent - set(params))
    embedded = SUPPORTED_SAMPLING_KEYS | set(DEFAULT_ONLY_SAMPLING_KEYS)
    assert embedded <= set(schema), embedded - set(schema)


def cli_flags(wheel) -> set[str]:
    """``--flags`` of ``python -m sglang.launch_server``: the A[...] fields of the argument groups (``Arg(no_cli=True)``
    excluded, aliases included) and the arguments server_args.py registers by hand."""
    flags = set()
    names = [n for n in wheel.namelist() if n.startswith("sglang/srt/arg_groups/fields/") and n.endswith(".py")]
    for name in names:
        for cls in ast.walk(tree(wheel, name)):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in cls.body:
                if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                        and isinstance(node.annotation, ast.Subscript)
                        and ast.unparse(node.annotation.value) == "A"):  # fmt: skip
                    continue
                meta = node.annotation.slice.elts[1] if isinstance(node.annotation.slice, ast.Tuple) else None
                keywords = {k.arg: k.value for k in meta.keywords} if isinstance(meta, ast.Call) else {}
                if isinstance(keywords.get("no_cli"), ast.Constant) and keywords["no_cli"].value is True:
                    continue
                cli = keywords.get("cli_name")
                flags.add(cli.value if isinstance(cli, ast.Constant) else "--" + node.target.id.replace("_", "-"))
                if isinstance(keywords.get("aliases"), ast.List):
                    flags |= {alias.value for alias in keywords["aliases"].elts}
    for node in ast.walk(tree(wheel, "sglang/srt/server_args.py")):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return flags


def test_every_launcher_flag_is_a_server_argument(wheel):
    assert "sglang/launch_server.py" in wheel.namelist()
    config = RolloutConfig(backend="sglang", tp_size=16, ep_size=16, dp_size=1, num_nodes=4, gpus_per_node=8,
                           host="0.0.0.0", port=30000, node_hosts=["h0", "h1", "h2", "h3"], enable_memory_saver=True,
                           deterministic_inference=True, weight_sync="disk")  # fmt: skip
    if hasattr(config, "enable_return_routed_experts"):
        config.enable_return_routed_experts = True
    replicas = RolloutConfig(backend="sglang", tp_size=2, dp_size=2, gpus_per_node=8, port=30000, weight_sync="disk")
    used = {arg for c in (config, replicas) for launch in plan_servers(c, "/ckpt") for arg in launch.argv
            if arg.startswith("--")}  # fmt: skip
    assert {"--ep-size", "--dp-size", "--nnodes", "--node-rank", "--dist-init-addr", "--enable-memory-saver",
            "--enable-deterministic-inference"} <= used  # fmt: skip
    flags = cli_flags(wheel)
    assert len(flags) > 200  # the parse found the argument groups
    assert not used - flags, f"not server arguments of SGLang {pinned_version()}: {sorted(used - flags)}"


def test_the_reply_fields_we_parse_are_the_ones_sglang_writes(wheel):
    manager = source(wheel, "sglang/srt/managers/tokenizer_manager.py")
    for key in ('"output_ids"', '"meta_info"', '"finish_reason"', '"weight_version"'):
        assert key in manager, f"the tokenizer manager no longer writes {key}"
    assert 'meta_info["output_token_logprobs"]' in manager
    assert 'meta_info["routed_experts"]' in manager  # return_routed_experts' reply (R3 routing replay)
    # (logprob, token_id, text) triples, in that order
    assert re.search(r"\(logprob, token_id, None\)", manager), "output_token_logprobs entries changed shape"
    entry = list(own_fields(classes(tree(wheel, "sglang/api/v1/api_types.py"))["LogprobEntry"]))
    assert entry == ["logprob", "token_id", "text"]
    meta = own_fields(classes(tree(wheel, "sglang/api/v1/api_types.py"))["GenerateMetaInfo"])
    assert {"finish_reason", "output_token_logprobs", "weight_version", "prompt_tokens", "completion_tokens"} <= set(
        meta
    )
    batch = source(wheel, "sglang/srt/managers/schedule_batch.py")
    for kind, key in (("stop", "matched"), ("length", "length"), ("abort", "message")):
        assert re.search(rf'"type": "{kind}",[^}}]*"{key}":', batch, re.S), f"finish reason {kind} lost {key}"
    server = source(wheel, "sglang/srt/entrypoints/http_server.py")
    assert server.count('{"success": success, "message": message}') >= 3  # update / session replies


def test_sessions_memory_tags_and_tensor_payloads_match_the_embedded_server(wheel):
    """The embedded server refuses what 0.5.23 refuses, with its words; its tags are SGLang's; the payloads our
    serializer writes unpickle under SGLang's SafeUnpickler allow-list, and our unpickler allows nothing more."""
    with open(os.path.join(ROOT, "megatron_sapo", "rollout", "server.py")) as f:
        embedded = f.read()
    updater = source(wheel, "sglang/srt/managers/scheduler_components/weight_updater.py")
    for endpoint in ("update_weights_from_distributed", "update_weights_from_tensor"):
        pattern = rf'"{endpoint} must run between "\s*"begin_weight_update\(\) and end_weight_update\(\)"'
        assert re.search(pattern, updater), f"SGLang no longer requires a session for {endpoint}"
        assert f'"{endpoint} must run between begin_weight_update() and "' in embedded
    assert "a weight-update session is already open" in updater and "no weight-update session is open" in updater
    update_from_disk = updater[updater.index("def update_weights_from_disk") : updater.index("def init_weights_upd")]
    assert "_session" not in update_from_disk  # disk reloads need no session

    from megatron_sapo.rollout.server import MEMORY_TAGS

    constants = tree(wheel, "sglang/srt/constants.py")
    values = {n.targets[0].id: n.value for n in constants.body if isinstance(n, ast.Assign)}
    all_types = {ast.literal_eval(values[e.id]) for e in values["GPU_MEMORY_ALL_TYPES"].elts}
    assert all_types == set(MEMORY_TAGS)
    assert "tags = GPU_MEMORY_ALL_TYPES" in updater  # no tags = all of them, on release and resume
    assert "self.offload_tags.remove(tag)" in updater  # resuming a tag that is not released raises

    common = tree(wheel, "sglang/srt/utils/common.py")
    safe = classes(common)["SafeUnpickler"]
    allowed = next(ast.literal_eval(n.value) for n in safe.body
                   if isinstance(n, ast.Assign) and n.targets[0].id == "ALLOWED_GLOBALS")  # fmt: skip
    assert _TensorUnpickler.ALLOWED <= allowed, _TensorUnpickler.ALLOWED - allowed

    _, views = pack_bucket([("w", torch.randn(3, 2)), ("b", torch.zeros(4, dtype=torch.bfloat16))])
    used = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            used.add((module, name))
            return super().find_class(module, name)

    import base64

    loaded = Recorder(io.BytesIO(base64.b64decode(serialize_named_tensors(views)))).load()
    assert [name for name, _ in loaded] == ["w", "b"] and torch.equal(loaded[0][1], views[0][1])
    assert used <= allowed, used - allowed
    assert ("torch.multiprocessing.reductions", "rebuild_cuda_tensor") in allowed  # what a GPU payload names
    worker = source(wheel, "sglang/srt/managers/tp_worker.py")
    assert "serialized_named_tensors[get_parallel().tp_rank]" in worker  # payload i is TP rank i's
