"""The embedded rollout server: SGLang's native HTTP API on CPU, backed by transformers.

    python -m megatron_sapo.rollout.server --model-path DIR --port P [--host 127.0.0.1]

It serves the subset of SGLang 0.5.23's endpoints the trainer uses, with SGLang's request and reply shapes (see
``client.py``), so that every rollout code path runs on a machine without a GPU: ``/generate``,
``/health``, ``/health_generate``, ``/model_info``, ``/server_info`` (and their deprecated ``/get_*`` names),
``/flush_cache``, ``/update_weights_from_disk``, ``/init_weights_update_group``, ``/begin_weight_update``,
``/update_weights_from_distributed``, ``/update_weights_from_tensor``, ``/end_weight_update``,
``/destroy_weights_update_group``, ``/release_memory_occupation``, ``/resume_memory_occupation``,
``/pause_generation``, ``/continue_generation``, ``/abort_request``. With an API key (``--api-key``, or
``$MEGATRON_SAPO_ROLLOUT_API_KEY`` as the launcher passes it) it refuses what SGLang's ``--api-key`` refuses, with
SGLang's 401 reply (rollout/auth.py).

Pause, continue and abort behave as SGLang 0.5.23's (``tokenizer_manager.py``): while paused, new ``/generate``
requests wait and no decode step runs, but weight updates do; ``mode=abort`` (the default) ends every request in
flight with its partial output and ``finish_reason {"type": "abort"}`` and returns once none is left, ``in_place``
and ``retract`` hold them where they are until ``/continue_generation``. ``/abort_request`` ends the requests whose
``rid`` starts with the given one (or all, ``abort_all``). Every reply carries ``meta_info.weight_versions``, the
spans of output tokens each weight version made, and ``weight_version``, the last one's.

It is as strict as SGLang 0.5.23 (``scheduler_components/weight_updater.py``), so CPU tests exercise the order a real
server demands: tensor and broadcast updates outside a begin/end session fail with SGLang's message, a second
begin (or an end without a begin) fails; release/resume track the three memory tags (none given = all three, a
resume of a tag that is not released fails). Where SGLang would silently run on freed memory, it refuses: a
``/generate`` while any tag is released, a weight update while ``weights`` is.

One worker thread owns the model and runs everything that touches it, one job at a time: generation requests that
arrive together are decoded as one batch (``decode.py``), weight updates wait for the batch in progress (SGLang
also pauses generation while it loads weights). With ``--tp-size N`` the server stands in for a TP-N SGLang server
in tensor updates: it takes ``serialized_named_tensors[r]`` as TP rank ``r``'s payload and loads from it the rows of
shard ``r`` of every tensor (``tensor_split`` along dim 0), so a model is complete only if every rank's payload
arrived and was right. In a weight-update group it plays a single TP rank (rank ``rank_offset``), so it joins one
only with ``--tp-size 1``. There is no KV cache to flush and no GPU memory to give back: flush is a no-op and
release/resume only record the state.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from megatron_sapo.lifetime import exit_with_parent
from megatron_sapo.rollout.auth import API_KEY_ENV, api_key_middleware
from megatron_sapo.rollout.decode import DecodeRequest, DecodeResult, decode_batch
from megatron_sapo.rollout.hf_weights import HFWeightWriter, iter_safetensors
from megatron_sapo.rollout.routed_experts import RoutedExpertsCapture, reply_routed_experts

logger = logging.getLogger("megatron_sapo.rollout.server")

# SGLang sampling_params keys this server implements, and those it accepts only at their default value.
SUPPORTED_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed",
                           "n", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                           "no_stop_trim"}  # fmt: skip
DEFAULT_ONLY_SAMPLING_KEYS = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                              "repetition_penalty": 1.0, "min_new_tokens": 0, "stop": None, "stop_regex": None,
                              "json_schema": None, "regex": None, "ebnf": None, "logit_bias": None}  # fmt: skip
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # sglang/srt/constants.py GPU_MEMORY_ALL_TYPES


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400), as opposed to the server failing (HTTP 500)."""


class ContractError(BadRequest):
    """A /generate body the API schema rejects (SGLang answers ``{"error": "<schema text>"}``)."""


# --- the model worker --------------------------------------------------------------------------------------------


@dataclass
class Live:
    """One generation row from its arrival to its reply: what /abort_request and a weight-version change touch."""

    rid: str
    abort: dict | None = None  # the finish_reason to end with, once aborted
    result: DecodeResult | None = None  # the partial result, once decoding
    # SGLang's WeightVersionEvent: (the version before a change, output tokens made by then)
    version_events: list[tuple[str, int]] = field(default_factory=list)


# SGLang's FINISH_ABORT().to_json() for a running request; one still queued ends with "Abort in waiting queue".
ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
ABORTED_WAITING = {"type": "abort", "message": "Abort in waiting queue"}


@dataclass
class _Job:
    future: Future
    rows: list[DecodeRequest] | None = None  # a generation job
    call: object = None  # or an admin job: a callable run on the worker thread
    lives: list[Live] | None = None  # a generation job's rows' Live records


@dataclass
class ServerState:
    model_path: str
    weight_version: str = "default"
    released: set[str] = field(default_factory=set)
    groups: dict = field(default_factory=dict)
    session: bool = False  # a weight-update session is open


class ModelWorker:
    """Runs generation batches and admin calls on one thread, in arrival order."""

    def __init__(self, model, *, eos_token_ids: frozenset[int], pad_token_id: int, max_positions: int,
                 max_batch_size: int = 64, batch_wait_s: float = 0.003,
                 return_routed_experts: bool = False):  # fmt: skip
        self.model = model
        self.return_routed_experts = return_routed_experts  # record the routers' top-k (--enable-return-routed-experts)
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wakeup = threading.Condition()
        self.paused = False  # /pause_generation: no decode step runs; admin jobs (weight updates) still do
        self._stepping = False  # a decode step (or a whole batch between holds) is running
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def generate(self, rows: list[DecodeRequest], lives: list[Live] | None = None) -> Future:
        return self._put(_Job(Future(), rows=rows, lives=lives or [Live(uuid.uuid4().hex) for _ in rows]))

    def set_paused(self, paused: bool) -> None:
        """Pausing returns once the decode step in progress is over (SGLang's scheduler acknowledges the pause
        between batches), so nothing is generated after it; blocking: from a coroutine, run it in a thread."""
        with self._wakeup:
            self.paused = paused
            self._wakeup.notify_all()
            while paused and self._stepping:
                self._wakeup.wait()

    def _hold(self) -> None:
        """Between decode steps: while paused, run the admin jobs that arrive (weight updates) and wait."""
        while True:
            with self._wakeup:
                self._stepping = False
                self._wakeup.notify_all()
                while self.paused and not any(job.rows is None for job in self._jobs):
                    self._wakeup.wait()
                if not self.paused:
                    self._stepping = True
                    return
                job = next(job for job in self._jobs if job.rows is None)
                self._jobs.remove(job)
            self._run_admin(job)

    def _run_admin(self, job: _Job) -> None:
        try:
            job.future.set_result(job.call())
        except BaseException as error:  # handed to the HTTP handler, which answers with it
            job.future.set_exception(error)

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
            # Paused: queued generation stays queued (SGLang's scheduler runs no inference), admin jobs run.
            while not self._jobs or (self.paused and all(job.rows is not None for job in self._jobs)):
                self._wakeup.wait()
            first = next(job for job in self._jobs if job.rows is None) if self.paused else self._jobs[0]
            self._jobs.remove(first)
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

    def _decode(self, rows: list[DecodeRequest], lives: list[Live]) -> list[DecodeResult]:
        capture = RoutedExpertsCapture(self.model) if self.return_routed_experts else contextlib.nullcontext()

        def between_steps(results: list[DecodeResult]) -> dict[int, dict]:
            self._hold()
            for live, result in zip(lives, results, strict=True):
                live.result = result
            return {row: live.abort for row, live in enumerate(lives) if live.abort is not None}

        with capture:
            results = decode_batch(self.model, rows, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                   max_positions=self.max_positions, between_steps=between_steps)  # fmt: skip
        if self.return_routed_experts:
            routings = capture.per_request([len(r.prompt_ids) for r in rows], [len(r.output_ids) for r in results])
            for result, routing in zip(results, routings):
                result.routed_experts = routing
        return results

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while True:
            jobs = self._next_jobs()
            if jobs[0].rows is None:
                self._run_admin(jobs[0])
                continue
            rows = [row for job in jobs for row in job.rows]
            lives = [live for job in jobs for live in job.lives]
            with self._wakeup:
                self._stepping = True
            for live in lives:  # aborted while queued
                if live.abort is not None:
                    live.abort = ABORTED_WAITING
            try:
                results: list[DecodeResult] = []
                for start in range(0, len(rows), self.max_batch_size):
                    end = start + self.max_batch_size
                    results += self._decode(rows[start:end], lives[start:end])
            except BaseException as error:
                for job in jobs:
                    job.future.set_exception(error)
                continue
            finally:
                with self._wakeup:
                    self._stepping = False
                    self._wakeup.notify_all()
            for job in jobs:
                job.future.set_result(results[: len(job.rows)])
                results = results[len(job.rows) :]


# --- request parsing ---------------------------------------------------------------------------------------------


def parse_sampling(params: dict, prompt_ids: list[int], vocab_size: int, max_positions: int) -> DecodeRequest:
    if not isinstance(params, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(params).__name__}")
    unknown = set(params) - SUPPORTED_SAMPLING_KEYS - set(DEFAULT_ONLY_SAMPLING_KEYS)
    if unknown:
        raise ContractError(f"unknown field `{sorted(unknown)[0]}` of sampling_params")
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


def routed_experts_request(body: dict, prompts: list[list[int]]) -> int | None:
    """SGLang's ``return_routed_experts`` / ``routed_experts_start_len`` (``io_struct.py``): the start position of
    the routing to return, or None when the request does not ask for it."""
    if not body.get("return_routed_experts"):
        return None
    start = body.get("routed_experts_start_len", 0)
    if not isinstance(start, int) or not 0 <= start <= min(len(p) for p in prompts):
        raise BadRequest(f"routed_experts_start_len={start!r} must be in [0, prompt_tokens]")
    return start


def weight_version_spans(events: list[tuple[str, int]], current: str, num_output_tokens: int) -> list[dict]:
    """SGLang's ``compute_weight_version_spans`` (``utils/weight_versions.py``): which weight version made which
    output tokens, from the (old version, tokens by then) events of the changes a request lived through; tokens
    ``[start, end)`` of each span. Versions that made no token leave no span."""
    spans: list[dict] = []
    for version, end in [*events, (current, num_output_tokens)]:
        end = min(end, num_output_tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans


def parse_rids(body: dict, num_prompts: int, n: int) -> list[str]:
    """Each row's request id: the body's ``rid`` (one string, or one per prompt), else a fresh one; the ``n`` samples
    of a prompt get ``<rid>_<j>`` after the first, so that /abort_request's prefix match reaches all of them."""
    given = body.get("rid")
    if given is None:
        bases = [uuid.uuid4().hex for _ in range(num_prompts)]
    elif isinstance(given, str) and num_prompts == 1:
        bases = [given]
    elif isinstance(given, list) and len(given) == num_prompts and all(isinstance(r, str) for r in given):
        bases = list(given)
    else:
        raise BadRequest("rid must be a string (one prompt) or a list of strings, one per prompt")
    return [base if j == 0 else f"{base}_{j}" for j in range(n) for base in bases]


def format_output(result: DecodeResult, prompt_len: int, return_logprob: bool, weight_version: str,
                  text: str, rid: str | None = None, version_events: list | None = None) -> dict:  # fmt: skip
    spans = weight_version_spans(version_events or [], weight_version, len(result.output_ids))
    meta = {
        "id": rid or uuid.uuid4().hex,
        "finish_reason": result.finish_reason,
        "prompt_tokens": prompt_len,
        "completion_tokens": len(result.output_ids),
        "cached_tokens": 0,
        "weight_version": spans[-1]["version"],
        "weight_versions": spans,
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


def build_app(
    model_path: str,
    *,
    dtype: str = "float32",
    max_batch_size: int = 64,
    dist_timeout_s: float = 600.0,
    tp_size: int = 1,
    return_routed_experts: bool = False,
    api_key: str | None = None,
):
    from aiohttp import web

    model, config = load_model(model_path, dtype)
    tokenizer = _load_tokenizer(model_path)
    vocab_size = int(config.vocab_size)
    max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    worker = ModelWorker(model, eos_token_ids=_eos_ids(model_path, config), pad_token_id=int(pad),
                         max_positions=max_positions, max_batch_size=max_batch_size,
                         return_routed_experts=return_routed_experts)  # fmt: skip
    writer = HFWeightWriter(model)
    state = ServerState(model_path=os.path.abspath(model_path))
    live_rows: dict[int, Live] = {}  # every generation row between its arrival and its reply
    unpaused = asyncio.Event()  # SGLang's is_pause_cond: new /generate requests wait while paused
    unpaused.set()

    def set_weight_version(body: dict) -> None:
        """A weight update's ``weight_version``; the rows it caught mid-generation remember where it changed."""
        version = body.get("weight_version")
        if version is None or str(version) == state.weight_version:
            return
        for live in live_rows.values():
            if live.result is not None and live.result.output_ids:
                live.version_events.append((state.weight_version, len(live.result.output_ids)))
        state.weight_version = str(version)

    def error_reply(status: int, message: str, contract: bool = False):
        # SGLang's shapes: the schema check's {"error": text}, else _create_error_response's {"error": {"message"}}.
        return web.json_response({"error": message if contract else {"message": message}}, status=status)

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
            return error_reply(400, str(error), contract=isinstance(error, ContractError))
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
        routed_experts_start_len = routed_experts_request(body, prompts)
        rows = [parse_sampling(s, p, vocab_size, max_positions) for p, s in zip(prompts, sampling, strict=True)]
        num_prompts = 1 if isinstance(body["input_ids"][0], int) else len(body["input_ids"])
        lives = [Live(rid) for rid in parse_rids(body, num_prompts, len(prompts) // num_prompts)]
        await unpaused.wait()
        live_rows.update((id(live), live) for live in lives)
        try:
            results = await asyncio.wrap_future(worker.generate(rows, lives))
        finally:
            for live in lives:
                live_rows.pop(id(live), None)
        outputs = []
        for prompt, params, want_logprob, result, live in zip(prompts, sampling, logprob, results, lives, strict=True):
            text = ""
            if tokenizer is not None:
                text = tokenizer.decode(result.output_ids, skip_special_tokens=params.get("skip_special_tokens", True))
            outputs.append(format_output(result, len(prompt), want_logprob, state.weight_version, text, live.rid,
                                         live.version_events))  # fmt: skip
            if routed_experts_start_len is not None and result.routed_experts is not None:
                outputs[-1]["meta_info"]["routed_experts"] = reply_routed_experts(
                    result.routed_experts, routed_experts_start_len
                )
        return web.json_response(outputs[0] if single else outputs)

    async def health(request):
        return web.Response(status=200)

    async def health_generate(request):
        if not state.released:  # like SGLang: one token through the model proves it works
            probe = DecodeRequest(prompt_ids=[0], max_new_tokens=1, temperature=0.0)
            await asyncio.wrap_future(worker.generate([probe]))
        return web.Response(status=200)

    # --- information ---

    async def model_info(request):
        return web.json_response({"model_path": state.model_path, "tokenizer_path": state.model_path,
                                  "is_generation": True, "preferred_sampling_params": None,
                                  "weight_version": state.weight_version, "model_type": config.model_type,
                                  "architectures": getattr(config, "architectures", None)})  # fmt: skip

    async def server_info(request):
        # /server_info is SGLang's resolved server arguments; these are the ones the trainer reads.
        return web.json_response({"model_path": state.model_path, "tp_size": tp_size, "pp_size": 1, "dp_size": 1,
                                  "attn_dp_size": 1, "ep_size": 1, "device": "cpu", "dtype": dtype,
                                  "max_running_requests": max_batch_size, "enable_memory_saver": True,
                                  "enable_deterministic_inference": True, "version": "megatron_sapo-embedded",
                                  "internal_states": [{"memory_released": sorted(state.released)}]})  # fmt: skip

    async def flush_cache(request):
        return web.Response(text="Cache flushed.\n")

    # --- weights ---

    async def update_weights_from_disk(request):
        body = await read_json(request)
        path = body.get("model_path")
        if not path:
            raise BadRequest("model_path is required")
        if "weights" in state.released:
            return result_reply(False, "the weights are released: resume_memory_occupation(tags=['weights']) first",
                                num_paused_requests=0)  # fmt: skip

        def load():
            count = writer.write(iter_safetensors(path))
            state.model_path = os.path.abspath(path)
            return count

        try:
            count = await on_worker(load)
        except (FileNotFoundError, ValueError, OSError) as error:
            return result_reply(False, f"Failed to update weights: {error}.", num_paused_requests=0)
        set_weight_version(body)
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
        if tp_size != 1:
            return result_reply(
                False,
                f"Failed to initialize custom process group: the embedded server joins as one "
                f"rank; it runs with --tp-size {tp_size}, use weight updates from tensors or disk.",
            )
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
        if not state.session:
            return result_reply(False, "update_weights_from_distributed must run between begin_weight_update() and "
                                "end_weight_update()")  # fmt: skip
        if "weights" in state.released:
            return result_reply(False, "the weights are released: resume_memory_occupation(tags=['weights']) first")
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
        set_weight_version(body)
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

    async def update_weights_from_tensor(request):
        from megatron_sapo.rollout.weight_sync import deserialize_named_tensors

        body = await read_json(request)
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or not all(isinstance(p, str) for p in payloads):
            raise BadRequest("serialized_named_tensors must be a list of base64 strings, one per TP rank")
        if not state.session:
            return result_reply(False, "update_weights_from_tensor must run between begin_weight_update() and "
                                "end_weight_update()")  # fmt: skip
        if "weights" in state.released:
            return result_reply(False, "the weights are released: resume_memory_occupation(tags=['weights']) first")
        if len(payloads) != tp_size:  # SGLang's TP rank r reads payloads[r]
            return result_reply(False, f"serialized_named_tensors has {len(payloads)} payload(s) for {tp_size} TP "
                                "rank(s)")  # fmt: skip
        if body.get("load_format") not in (None, "direct"):
            return result_reply(False, f"load_format {body['load_format']!r} is not supported by the embedded server")

        def load():
            ranks = [deserialize_named_tensors(payload) for payload in payloads]
            names = [[(name, tuple(t.shape)) for name, t in named] for named in ranks]
            if any(other != names[0] for other in names[1:]):
                raise ValueError("the TP ranks' payloads name different tensors")
            if tp_size == 1:
                return writer.write(ranks[0])
            with torch.no_grad():  # every destination checked (writer.destination) before anything is written
                pairs = [[(writer.destination(name, t.shape), t) for name, t in named] for named in ranks]
                for rank, rank_pairs in enumerate(pairs):
                    for dest, tensor in rank_pairs:
                        if tensor.dim() == 0:
                            if rank == 0:
                                dest.copy_(tensor)
                            continue
                        dest.tensor_split(tp_size)[rank].copy_(tensor.tensor_split(tp_size)[rank])
            return len(names[0])

        try:
            count = await on_worker(load)
        except Exception as error:
            return result_reply(False, f"Failed to update weights from tensors: {error}.")
        set_weight_version(body)
        return result_reply(True, f"Success ({count} tensors).")

    # --- pause, continue, abort (SGLang's tokenizer_manager.pause_generation / continue_generation / abort_request) ---

    def abort(rid: str = "", abort_all: bool = False) -> int:
        hits = [live for live in live_rows.values() if abort_all or live.rid.startswith(rid)]
        for live in hits:
            live.abort = live.abort or ABORTED
        return len(hits)

    async def pause_generation(request):
        body = await read_json(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise ContractError(f"mode: Input should be 'abort', 'retract' or 'in_place', got {mode!r}")
        unpaused.clear()
        await asyncio.to_thread(worker.set_paused, True)
        if mode == "abort":
            # Every request in flight ends now, with its partial output and finish_reason abort; like SGLang, the
            # call returns once none is left. retract and in_place keep them, to go on after /continue_generation
            # (the same here: there is no KV cache to give back).
            worker.set_paused(False)  # an aborted row ends at its next decode step
            while abort(abort_all=True):
                await asyncio.sleep(0.01)
            await asyncio.to_thread(worker.set_paused, True)
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(request):
        await read_json(request)
        worker.set_paused(False)
        unpaused.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(request):
        body = await read_json(request)
        rid, abort_all = body.get("rid") or "", bool(body.get("abort_all", False))
        if rid or abort_all:  # SGLang ignores an empty rid without abort_all (it would prefix-match everything)
            abort(str(rid), abort_all)
        return web.Response(status=200)

    async def begin_weight_update(request):
        await read_json(request)
        if state.session:
            return result_reply(False, "a weight-update session is already open; call end_weight_update() first")
        state.session = True
        return result_reply(True, "Success")

    async def end_weight_update(request):
        await read_json(request)
        if not state.session:
            return result_reply(False, "no weight-update session is open; call begin_weight_update() first")
        state.session = False
        return result_reply(True, "Success")

    # --- memory (colocation) ---

    def memory_tags(body: dict, resume: bool) -> list[str]:
        tags = body.get("tags") or list(MEMORY_TAGS)  # SGLang: none or [] = all three
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise BadRequest(f"unknown memory tag(s) {unknown}; SGLang's are {list(MEMORY_TAGS)}")
        wrong = [t for t in tags if (t in state.released) != resume]
        if wrong:  # SGLang: a resume of a tag not released raises (offload_tags.remove); a second release frees twice
            state_word = "not released" if resume else "already released"
            raise BadRequest(f"memory tag(s) {wrong} {state_word} (released: {sorted(state.released)})")
        return tags

    async def release_memory_occupation(request):
        body = await read_json(request)
        # After the batch in progress: SGLang asserts the server is idle.
        await on_worker(lambda: state.released.update(memory_tags(body, resume=False)))
        return web.json_response(None)

    async def resume_memory_occupation(request):
        body = await read_json(request)
        await on_worker(lambda: state.released.difference_update(memory_tags(body, resume=True)))
        return web.json_response(None)

    # SGLang's API-key rule first, so that a refused request touches nothing (rollout/auth.py).
    app = web.Application(middlewares=[api_key_middleware(api_key), errors], client_max_size=1 << 30)
    app.router.add_route("POST", "/generate", generate)
    app.router.add_route("PUT", "/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    for path, handler in (("/model_info", model_info), ("/server_info", server_info),
                          ("/get_model_info", model_info), ("/get_server_info", server_info)):  # fmt: skip
        app.router.add_get(path, handler)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/flush_cache", flush_cache)
        app.router.add_route(method, "/release_memory_occupation", release_memory_occupation)
        app.router.add_route(method, "/resume_memory_occupation", resume_memory_occupation)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    app.router.add_post("/init_weights_update_group", init_weights_update_group)
    app.router.add_post("/update_weights_from_distributed", update_weights_from_distributed)
    app.router.add_post("/update_weights_from_tensor", update_weights_from_tensor)
    app.router.add_post("/begin_weight_update", begin_weight_update)
    app.router.add_post("/pause_generation", pause_generation)
    app.router.add_post("/continue_generation", continue_generation)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/end_weight_update", end_weight_update)
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
    parser.add_argument("--tp-size", type=int, default=1, help="TP ranks it stands in for in tensor updates")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--api-key", help=f"SGLang's flag (visible to ps: launchers pass ${API_KEY_ENV} instead)")
    parser.add_argument("--enable-return-routed-experts", action="store_true",
                        help="SGLang's flag: replies carry meta_info.routed_experts when a request asks")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)  # the CPU is shared with the trainer's ranks
    exit_with_parent()  # it runs in its own session, so nothing else ends it when the trainer is killed

    from aiohttp import web

    app = build_app(args.model_path, dtype=args.dtype, max_batch_size=args.max_batch_size,
                    dist_timeout_s=args.dist_timeout_s, tp_size=args.tp_size,
                    return_routed_experts=args.enable_return_routed_experts,
                    api_key=os.environ.pop(API_KEY_ENV, None) or args.api_key)  # fmt: skip
    logger.info("embedded rollout server for %s on http://%s:%d", args.model_path, args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()
