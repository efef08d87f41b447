"""The embedded rollout server: SGLang's native HTTP API on CPU, backed by transformers.

    python -m megatron_sapo.rollout.server --model-path DIR --port P [--host 127.0.0.1]

It serves the subset of SGLang's endpoints the trainer uses, with SGLang's request and reply shapes (see
``client.py``), so that every rollout code path runs on a machine without a GPU: ``/generate``,
``/health``, ``/health_generate``, ``/get_model_info``, ``/get_server_info``, ``/flush_cache``,
``/update_weights_from_disk``, ``/init_weights_update_group``, ``/update_weights_from_distributed``,
``/destroy_weights_update_group``, ``/release_memory_occupation``, ``/resume_memory_occupation``.

One worker thread owns the model and runs everything that touches it, one job at a time: generation requests that
arrive together are decoded as one batch (``decode.py``), weight updates wait for the batch in progress (SGLang
also pauses generation while it loads weights). The server plays a single TP rank: in a weight-update group it is
rank ``rank_offset``. There is no KV cache to flush between requests and no GPU memory to give back: flush is a
no-op, and release/resume only record the state — a released server refuses ``/generate`` until resumed, as
colocated training would need.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from megatron_sapo.lifetime import exit_with_parent
from megatron_sapo.rollout.decode import DecodeRequest, DecodeResult, decode_batch
from megatron_sapo.rollout.hf_weights import HFWeightWriter, iter_safetensors

logger = logging.getLogger("megatron_sapo.rollout.server")

# SGLang sampling_params keys this server implements, and those it accepts only at their default value.
SUPPORTED_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed",
                           "n", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                           "no_stop_trim"}  # fmt: skip
DEFAULT_ONLY_SAMPLING_KEYS = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                              "repetition_penalty": 1.0, "min_new_tokens": 0, "stop": None, "stop_regex": None,
                              "json_schema": None, "regex": None, "ebnf": None, "logit_bias": None}  # fmt: skip
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400), as opposed to the server failing (HTTP 500)."""


# --- the model worker --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    future: Future
    rows: list[DecodeRequest] | None = None  # a generation job
    call: object = None  # or an admin job: a callable run on the worker thread


@dataclass
class ServerState:
    model_path: str
    weight_version: str = "default"
    released: set[str] = field(default_factory=set)
    groups: dict = field(default_factory=dict)


class ModelWorker:
    """Runs generation batches and admin calls on one thread, in arrival order."""

    def __init__(self, model, *, eos_token_ids: frozenset[int], pad_token_id: int, max_positions: int,
                 max_batch_size: int = 64, batch_wait_s: float = 0.003):  # fmt: skip
        self.model = model
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def generate(self, rows: list[DecodeRequest]) -> Future:
        return self._put(_Job(Future(), rows=rows))

    def call(self, fn) -> Future:
        return self._put(_Job(Future(), call=fn))

    def _put(self, job: _Job) -> Future:
        with self._wakeup:
            self._jobs.append(job)
            self._wakeup.notify()
        return job.future

    def _next_jobs(self) -> list[_Job]:
        """The next admin job alone, or the generation jobs queued now (after a short wait for stragglers)."""
        with self._wakeup:
            while not self._jobs:
                self._wakeup.wait()
            first = self._jobs.popleft()
        if first.rows is None:
            return [first]
        time.sleep(self.batch_wait_s)  # requests sent together arrive a few hundred microseconds apart
        jobs, rows = [first], len(first.rows)
        with self._wakeup:
            while self._jobs and self._jobs[0].rows is not None:
                if rows + len(self._jobs[0].rows) > self.max_batch_size:
                    break
                job = self._jobs.popleft()
                jobs.append(job)
                rows += len(job.rows)
        return jobs

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while True:
            jobs = self._next_jobs()
            if jobs[0].rows is None:
                job = jobs[0]
                try:
                    job.future.set_result(job.call())
                except BaseException as error:  # handed to the HTTP handler, which answers with it
                    job.future.set_exception(error)
                continue
            rows = [row for job in jobs for row in job.rows]
            try:
                results: list[DecodeResult] = []
                for start in range(0, len(rows), self.max_batch_size):
                    results += decode_batch(self.model, rows[start : start + self.max_batch_size],
                                            eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                            max_positions=self.max_positions)  # fmt: skip
            except BaseException as error:
                for job in jobs:
                    job.future.set_exception(error)
                continue
            for job in jobs:
                job.future.set_result(results[: len(job.rows)])
                results = results[len(job.rows) :]


# --- request parsing ---------------------------------------------------------------------------------------------


def parse_sampling(params: dict, prompt_ids: list[int], vocab_size: int, max_positions: int) -> DecodeRequest:
    if not isinstance(params, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(params).__name__}")
    unknown = set(params) - SUPPORTED_SAMPLING_KEYS - set(DEFAULT_ONLY_SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"unknown sampling_params {sorted(unknown)}")
    for key, default in DEFAULT_ONLY_SAMPLING_KEYS.items():
        if params.get(key, default) not in (default, [], {}):
            raise BadRequest(f"sampling_params.{key}={params[key]!r} is not supported by the embedded server")

    def get(key, default):
        value = params.get(key)
        return default if value is None else value

    temperature = float(get("temperature", 1.0))
    top_p = float(get("top_p", 1.0))
    top_k = int(get("top_k", -1))
    max_new_tokens = int(get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS))
    if temperature < 0:
        raise BadRequest(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.")
    if top_k < 1 and top_k != -1:
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if max_new_tokens < 0:
        raise BadRequest(f"max_new_tokens must be at least 0, got {max_new_tokens}.")
    stop_ids = get("stop_token_ids", [])
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise BadRequest("stop_token_ids must be a list of integers")
    seed = params.get("sampling_seed")
    if seed is not None and not isinstance(seed, int):
        raise BadRequest(f"sampling_seed must be an integer, got {seed!r}")
    if not prompt_ids:
        raise BadRequest("input_ids cannot be empty.")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt_ids):
        raise BadRequest(f"input_ids must be token ids in [0, {vocab_size})")
    if len(prompt_ids) >= max_positions:
        raise BadRequest(f"The input ({len(prompt_ids)} tokens) is longer than the model's context length "
                         f"({max_positions} tokens).")  # fmt: skip
    return DecodeRequest(
        prompt_ids=list(prompt_ids),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=frozenset(stop_ids),
        seed=seed,
        ignore_eos=bool(params.get("ignore_eos", False)),
    )


def expand_generate_request(body: dict) -> tuple[bool, list[list[int]], list[dict], list[bool]]:
    """SGLang's normalisation of a GenerateReqInput: single or batch, and ``n`` copies of the batch appended in
    turn (``input_ids * n``). Returns (is_single, prompt per row, sampling params per row, return_logprob per row)."""
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by the embedded server")
    input_ids = body.get("input_ids")
    if input_ids is None:
        raise BadRequest("send input_ids: the embedded server does not tokenize text or take embeddings")
    if not isinstance(input_ids, list) or not input_ids:
        raise BadRequest("input_ids cannot be empty.")
    single = isinstance(input_ids[0], int)
    prompts = [input_ids] if single else input_ids
    if not all(isinstance(p, list) for p in prompts):
        raise BadRequest("input_ids must be a list of ints or a list of lists of ints")
    sampling = body.get("sampling_params") or {}
    if isinstance(sampling, list):
        if len(sampling) != len(prompts):
            raise BadRequest("sampling_params: one object per prompt, or one for all")
        per_prompt = sampling
    else:
        per_prompt = [sampling] * len(prompts)
    ns = {(p.get("n") or 1) if isinstance(p, dict) else 1 for p in per_prompt}
    if len(ns) != 1:
        raise BadRequest("The parallel_sample_num should be the same for all samples in sample params.")
    n = int(ns.pop())
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}")
    logprob = body.get("return_logprob") or False
    per_prompt_logprob = logprob if isinstance(logprob, list) else [bool(logprob)] * len(prompts)
    if len(per_prompt_logprob) != len(prompts):
        raise BadRequest("return_logprob: one value per prompt, or one for all")
    if n > 1:
        single = False
    return single, prompts * n, per_prompt * n, [bool(x) for x in per_prompt_logprob] * n


def format_output(result: DecodeResult, prompt_len: int, return_logprob: bool, weight_version: str,
                  text: str) -> dict:  # fmt: skip
    meta = {
        "id": uuid.uuid4().hex,
        "finish_reason": result.finish_reason,
        "prompt_tokens": prompt_len,
        "completion_tokens": len(result.output_ids),
        "cached_tokens": 0,
        "weight_version": weight_version,
    }
    if return_logprob:
        # SGLang's (logprob, token_id, text) triples; text only with return_text_in_logprobs.
        meta["input_token_logprobs"] = []
        pairs = zip(result.logprobs, result.output_ids, strict=True)
        meta["output_token_logprobs"] = [[logprob, token, None] for logprob, token in pairs]
    return {"text": text, "output_ids": list(result.output_ids), "meta_info": meta}


# --- the HTTP application ----------------------------------------------------------------------------------------


def load_model(model_path: str, dtype: str = "float32"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    return model, config


def _eos_ids(model_path: str, config) -> frozenset[int]:
    """The model's stop tokens: eos of config.json and of generation_config.json (SGLang reads both)."""
    ids: set[int] = set()
    sources = [config]
    try:
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(model_path))
    except Exception:  # no generation_config.json
        pass
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(int(i) for i in (value if isinstance(value, list) else [value]))
    return frozenset(ids)


def _load_tokenizer(model_path: str):
    try:
        from megatron_sapo.data.tokenizer import load_tokenizer

        return load_tokenizer(model_path)
    except Exception as error:  # text is a convenience; ids are what matters
        logger.warning("no tokenizer at %s (%s): replies carry empty text", model_path, error)
        return None


def build_app(model_path: str, *, dtype: str = "float32", max_batch_size: int = 64, dist_timeout_s: float = 600.0):
    from aiohttp import web

    model, config = load_model(model_path, dtype)
    tokenizer = _load_tokenizer(model_path)
    vocab_size = int(config.vocab_size)
    max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    worker = ModelWorker(model, eos_token_ids=_eos_ids(model_path, config), pad_token_id=int(pad),
                         max_positions=max_positions, max_batch_size=max_batch_size)  # fmt: skip
    writer = HFWeightWriter(model)
    state = ServerState(model_path=os.path.abspath(model_path))

    def error_reply(status: int, message: str):
        # SGLang's ErrorResponse shape.
        kind = "Bad Request" if status == 400 else "Internal Server Error"
        return web.json_response({"object": "error", "message": message, "type": kind, "code": status}, status=status)

    def result_reply(success: bool, message: str, **extra):
        return web.json_response({"success": success, "message": message, **extra}, status=200 if success else 400)

    async def read_json(request):
        if not request.can_read_body:
            return {}
        try:
            return await request.json()
        except ValueError as error:
            raise BadRequest(f"the body is not JSON: {error}") from None

    async def on_worker(fn):
        return await asyncio.wrap_future(worker.call(fn))

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except BadRequest as error:
            return error_reply(400, str(error))
        except web.HTTPException:
            raise
        except Exception as error:
            logger.exception("%s %s failed", request.method, request.path)
            return error_reply(500, f"{type(error).__name__}: {error}")

    # --- generation ---

    async def generate(request):
        body = await read_json(request)
        if state.released:
            raise BadRequest(f"memory released ({', '.join(sorted(state.released))}): call /resume_memory_occupation "
                             "before /generate")  # fmt: skip
        single, prompts, sampling, logprob = expand_generate_request(body)
        rows = [parse_sampling(s, p, vocab_size, max_positions) for p, s in zip(prompts, sampling, strict=True)]
        results = await asyncio.wrap_future(worker.generate(rows))
        outputs = []
        for prompt, params, want_logprob, result in zip(prompts, sampling, logprob, results, strict=True):
            text = ""
            if tokenizer is not None:
                text = tokenizer.decode(result.output_ids, skip_special_tokens=params.get("skip_special_tokens", True))
            outputs.append(format_output(result, len(prompt), want_logprob, state.weight_version, text))
        return web.json_response(outputs[0] if single else outputs)

    async def health(request):
        return web.Response(status=200)

    async def health_generate(request):
        if not state.released:  # like SGLang: one token through the model proves it works
            probe = DecodeRequest(prompt_ids=[0], max_new_tokens=1, temperature=0.0)
            await asyncio.wrap_future(worker.generate([probe]))
        return web.Response(status=200)

    # --- information ---

    async def get_model_info(request):
        return web.json_response({"model_path": state.model_path, "tokenizer_path": state.model_path,
                                  "is_generation": True, "preferred_sampling_params": None,
                                  "weight_version": state.weight_version})  # fmt: skip

    async def get_server_info(request):
        return web.json_response({"model_path": state.model_path, "tp_size": 1, "pp_size": 1, "dp_size": 1,
                                  "ep_size": 1, "device": "cpu", "max_batch_size": max_batch_size, "dtype": dtype,
                                  "weight_version": state.weight_version, "version": "megatron_sapo-embedded",
                                  "memory_released": sorted(state.released)})  # fmt: skip

    async def flush_cache(request):
        return web.Response(text="Cache flushed.\n")

    # --- weights ---

    async def update_weights_from_disk(request):
        body = await read_json(request)
        path = body.get("model_path")
        if not path:
            raise BadRequest("model_path is required")

        def load():
            count = writer.write(iter_safetensors(path))
            state.model_path = os.path.abspath(path)
            return count

        try:
            count = await on_worker(load)
        except (FileNotFoundError, ValueError, OSError) as error:
            return result_reply(False, f"Failed to update weights: {error}.", num_paused_requests=0)
        if body.get("weight_version") is not None:
            state.weight_version = str(body["weight_version"])
        return result_reply(True, f"Succeeded to update model weights ({count} tensors).", num_paused_requests=0)

    async def init_weights_update_group(request):
        from megatron_sapo.rollout.weight_sync import destroy_custom_process_group, init_custom_process_group

        body = await read_json(request)
        try:
            address, port = str(body["master_address"]), int(body["master_port"])
            rank_offset, world_size = int(body["rank_offset"]), int(body["world_size"])
        except (KeyError, TypeError, ValueError) as error:
            raise BadRequest(f"init_weights_update_group needs master_address, master_port, rank_offset, "
                             f"world_size: {error}") from None  # fmt: skip
        name = body.get("group_name") or "weight_update_group"
        backend = body.get("backend") or "nccl"
        if backend != "gloo":
            return result_reply(False, f"Failed to initialize custom process group: backend {backend!r} needs GPUs; "
                                "the embedded server runs on CPU, use gloo.")  # fmt: skip

        def join():
            if name in state.groups:  # a trainer that restarted: its old group is gone
                destroy_custom_process_group(state.groups.pop(name))
            state.groups[name] = init_custom_process_group(backend=backend, master_address=address,
                                                           master_port=port, world_size=world_size,
                                                           rank=rank_offset, group_name=name,
                                                           timeout_s=dist_timeout_s)  # fmt: skip

        try:
            await on_worker(join)
        except Exception as error:
            return result_reply(False, f"Failed to initialize custom process group: {error}.")
        return result_reply(True, "Succeeded to initialize custom process group.")

    async def update_weights_from_distributed(request):
        body = await read_json(request)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not (
            len(names) == len(dtypes) == len(shapes)
        ):
            raise BadRequest("names, dtypes and shapes must be lists of one length")
        name = body.get("group_name") or "weight_update_group"
        group = state.groups.get(name)
        if group is None:
            return result_reply(False, f"Group {name} not in {sorted(state.groups)}. Please call "
                                "`init_weights_update_group` first.")  # fmt: skip
        if body.get("load_format") not in (None, "auto"):
            return result_reply(False, f"load_format {body['load_format']!r} is not supported by the embedded server")

        def receive_and_load():
            # Receive every announced tensor before checking any name: the sender broadcasts them all regardless,
            # and the group must stay in step even when the bucket is then refused.
            received = []
            for tensor_name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                tensor = torch.empty([int(s) for s in shape], dtype=getattr(torch, str(dtype)))
                group.broadcast(tensor, 0).wait()
                received.append((tensor_name, tensor))
            return writer.write(received)

        try:
            count = await on_worker(receive_and_load)
        except Exception as error:
            return result_reply(False, f"Failed to update parameter online: {error}. This bucket was not loaded; "
                                "earlier buckets of the update were.")  # fmt: skip
        if body.get("weight_version") is not None:
            state.weight_version = str(body["weight_version"])
        return result_reply(True, f"Succeeded to update parameter online ({count} tensors).")

    async def destroy_weights_update_group(request):
        from megatron_sapo.rollout.weight_sync import destroy_custom_process_group

        body = await read_json(request)
        name = body.get("group_name") or "weight_update_group"
        group = state.groups.pop(name, None)
        if group is None:
            return result_reply(False, f"Group {name} not found.")
        await on_worker(lambda: destroy_custom_process_group(group))
        return result_reply(True, "Succeeded to destroy custom process group.")

    # --- memory (colocation) ---

    async def release_memory_occupation(request):
        body = await read_json(request)
        tags = body.get("tags") or ["weights", "kv_cache"]
        await on_worker(lambda: state.released.update(tags))  # after the batch in progress
        return web.json_response(None)

    async def resume_memory_occupation(request):
        body = await read_json(request)
        tags = body.get("tags") or sorted(state.released)
        state.released.difference_update(tags)
        return web.json_response(None)

    app = web.Application(middlewares=[errors], client_max_size=1 << 30)
    app.router.add_route("POST", "/generate", generate)
    app.router.add_route("PUT", "/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_get("/get_server_info", get_server_info)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/flush_cache", flush_cache)
        app.router.add_route(method, "/release_memory_occupation", release_memory_occupation)
        app.router.add_route(method, "/resume_memory_occupation", resume_memory_occupation)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    app.router.add_post("/init_weights_update_group", init_weights_update_group)
    app.router.add_post("/update_weights_from_distributed", update_weights_from_distributed)
    app.router.add_post("/destroy_weights_update_group", destroy_weights_update_group)
    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="HF checkpoint folder (config.json + safetensors)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together")
    parser.add_argument("--dist-timeout-s", type=float, default=600.0, help="weight-update group timeout")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)  # the CPU is shared with the trainer's ranks
    exit_with_parent()  # it runs in its own session, so nothing else ends it when the trainer is killed

    from aiohttp import web

    app = build_app(args.model_path, dtype=args.dtype, max_batch_size=args.max_batch_size,
                    dist_timeout_s=args.dist_timeout_s)  # fmt: skip
    logger.info("embedded rollout server for %s on http://%s:%d", args.model_path, args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()
