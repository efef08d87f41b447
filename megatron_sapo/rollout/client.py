"""An asyncio client for SGLang's native HTTP API, the one protocol both rollout servers speak.

Requests and responses follow SGLang (``python/sglang/srt/entrypoints/http_server.py`` and the request structs in
``python/sglang/srt/managers/io_struct.py``):

- ``POST /generate`` with ``GenerateReqInput`` fields ``input_ids``, ``sampling_params`` and ``return_logprob``;
  ``sampling_params`` keys are SGLang's (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``,
  ``stop_token_ids``, ``sampling_seed``, ``ignore_eos``). The reply is ``{"text", "output_ids", "meta_info"}``
  with ``meta_info.finish_reason`` = ``{"type": "stop", "matched": id}`` | ``{"type": "length", "length": n}`` |
  ``{"type": "abort", ...}`` and ``meta_info.output_token_logprobs`` = ``[[logprob, token_id, text], ...]``.
- Log-prob semantics (``python/sglang/srt/layers/sampler.py``): by default SGLang reports
  ``log_softmax(logits / temperature)`` at the sampled token, over the whole vocabulary (top-k/top-p only shape
  the sampling support); with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` it reports the unscaled ``log_softmax(logits)``
  instead (do not set it: the trainer divides by the temperature). Greedy requests (temperature 0) report
  ``log_softmax(logits)``, as SGLang runs them as top_k=1 at temperature 1.
- ``n`` responses per prompt are ``n`` requests, each with its own ``sampling_seed`` (as slime does): SGLang's
  ``sampling_params.n`` would give the copies one seed. SGLang honours the seed only when launched with
  ``--enable-deterministic-inference`` (and then gives requests without one the seed 42, so a seed is always sent);
  the embedded server always does.
- ``/health_generate``, ``/flush_cache``, ``/server_info``, ``/model_info``, ``/update_weights_from_disk``
  (``model_path``), ``/init_weights_update_group`` (``master_address``, ``master_port``, ``rank_offset``,
  ``world_size``, ``group_name``, ``backend``), ``/destroy_weights_update_group``, and inside a weight-update
  session (``/begin_weight_update`` … ``/end_weight_update``; SGLang 0.5.23 refuses these two outside one)
  ``/update_weights_from_distributed`` (``names``, ``dtypes``, ``shapes``, ``group_name``, ``flush_cache``) and
  ``/update_weights_from_tensor`` (``serialized_named_tensors``: one base64 ``MultiprocessingSerializer`` payload
  per TP rank), ``/release_memory_occupation`` and ``/resume_memory_occupation`` (``tags``: ``kv_cache``,
  ``weights``, ``cuda_graph``; none = all three).

Failures: a connection error, a timeout or a 5xx reply is retried (``max_retries`` times, backoff doubling, on the
next server in turn); a 4xx reply is a bad request and fails at once. A server found gone stops the retries at once
with :class:`RolloutServerDown`: its process exited (``exit_reason``, set by whoever started it), or, after a
failed connection with no other server to retry on, it does not answer ``/health``. Retry warnings are logged once
per server and attempt, not once per request. Either way the caller gets one
:class:`RolloutError` naming the endpoint, the servers tried and the last error. Every attempt is bounded by the
request timeout, so nothing waits longer than ``(max_retries + 1) × (request_timeout_s + backoff)``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import threading
import uuid
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from megatron_sapo.rollout.auth import API_KEY_ENV, UNAUTHORIZED_STATUS, authorization_header

logger = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The rollout servers could not do what was asked (after the retries that make sense)."""


class RolloutServerDown(RolloutError):
    """A rollout server is gone (its process exited, or it does not answer its health check): no retry can help."""


class _Retryable(Exception):
    """An attempt failed in a way another attempt (or another server) may not."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None  # SGLang's sampling_seed
    ignore_eos: bool = False
    # Not a sampling parameter but a GenerateReqInput field: ask for meta_info.routed_experts (all positions).
    return_routed_experts: bool = False

    def to_sglang(self) -> dict[str, Any]:
        """SGLang's ``sampling_params`` dict (``python/sglang/srt/sampling/sampling_params.py`` key names)."""
        params: dict[str, Any] = {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "max_new_tokens": int(self.max_new_tokens),
        }
        if self.stop_token_ids:
            params["stop_token_ids"] = sorted({int(t) for t in self.stop_token_ids})
        if self.seed is not None:
            params["sampling_seed"] = int(self.seed)
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params


@dataclass
class RolloutSample:
    prompt_ids: list[int]
    response_ids: list[int]  # includes the stop token when finish_reason is "stop"
    logprobs: list[float]  # per response token, under softmax(logits / temperature)
    finish_reason: str  # "stop" | "length"
    matched_stop: int | None = None
    weight_version: str | None = None
    meta_info: dict = field(default_factory=dict, repr=False)


def generate_payload(prompt_ids: Sequence[int], sampling: SamplingParams) -> dict[str, Any]:
    """The ``/generate`` body for one prompt (``GenerateReqInput``)."""
    payload = {"input_ids": [int(t) for t in prompt_ids], "sampling_params": sampling.to_sglang()}
    return payload | {"return_logprob": True} | routed_experts_fields(sampling.return_routed_experts)


def routed_experts_fields(wanted: bool, start_len: int = 0) -> dict[str, Any]:
    """GenerateReqInput's ``return_routed_experts`` / ``routed_experts_start_len``: the reply's
    ``meta_info.routed_experts`` then covers positions ``[start_len, seq_len - 1)`` (models/routing_replay.py)."""
    return {"return_routed_experts": True, "routed_experts_start_len": int(start_len)} if wanted else {}


def parse_generate_response(reply: Any, prompt_ids: Sequence[int]) -> RolloutSample:
    """One ``/generate`` reply → a sample; raises RolloutError on a reply that is not SGLang's shape."""
    if not isinstance(reply, dict) or not isinstance(reply.get("meta_info"), dict):
        raise RolloutError(f"/generate reply is not SGLang's {{text, output_ids, meta_info}}: {str(reply)[:300]}")
    meta = reply["meta_info"]
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise RolloutError("/generate reply has no meta_info.output_token_logprobs; was return_logprob dropped?")
    response_ids = [int(t[1]) for t in triples]
    logprobs = [float(t[0]) for t in triples]
    output_ids = reply.get("output_ids")
    if output_ids is not None and [int(t) for t in output_ids] != response_ids:
        raise RolloutError(f"/generate reply: output_ids {list(output_ids)[:8]}... disagree with the token ids of "
                           f"output_token_logprobs {response_ids[:8]}...")  # fmt: skip
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    matched = reason.get("matched") if isinstance(reason, dict) else None
    return RolloutSample(
        prompt_ids=list(prompt_ids),
        response_ids=response_ids,
        logprobs=logprobs,
        finish_reason=str(kind),
        matched_stop=matched if isinstance(matched, int) else None,
        weight_version=meta.get("weight_version"),
        meta_info=meta,
    )


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A well-mixed 31-bit seed per (call seed, prompt, sample): neighbouring calls share no streams."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) % 2**64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) % 2**64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x % (2**31 - 1)


class RolloutClient:
    """Talks to one server, several (round-robin), or an sglang-router. Create and use it on one event loop."""

    def __init__(self, urls: Sequence[str] = (), *, router_url: str | None = None, concurrency: int = 256,
                 request_timeout_s: float = 600.0, max_retries: int = 3, retry_backoff_s: float = 1.0,
                 api_key: str | None = None):  # fmt: skip
        if not urls and not router_url:
            raise ValueError("RolloutClient needs server URLs or a router URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.concurrency = concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._headers = authorization_header(api_key)  # sent on every call (rollout/auth.py)
        self._turn = itertools.count()
        self._session = None
        self._semaphore: asyncio.Semaphore | None = None
        # Set by whoever started the servers: ``url -> why it is gone`` (a process that exited), or None.
        self.exit_reason = None
        self._down_checks: dict[str, asyncio.Task] = {}
        self._warned: set[tuple] = set()
        self.aborted_requests = 0  # requests generate_first_groups aborted that answered with finish_reason abort

    # --- plumbing -------------------------------------------------------------------------------------------------

    async def _http(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency),
                                                  headers=self._headers)  # fmt: skip
            self._semaphore = asyncio.Semaphore(self.concurrency)
        return self._session

    def _generate_url(self, turn: int, attempt: int) -> str:
        # Round-robin over requests; a retry moves on to the next server, so one dead server costs one attempt.
        if self.router_url:
            return self.router_url
        return self.urls[(turn + attempt) % len(self.urls)]

    async def request(self, method: str, path: str, payload: Any = None, *, url: str | None = None,
                      retries: int | None = None, timeout_s: float | None = None, check=None) -> Any:  # fmt: skip
        """One call with retries. ``url=None`` spreads attempts over the generate targets; ``check`` may raise
        ``_Retryable`` on a 200 reply that should be tried again. Returns the parsed JSON (or text) reply."""
        import aiohttp

        session = await self._http()
        attempts = 1 + (self.max_retries if retries is None else retries)
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        tried, last_error, turn = [], "", next(self._turn)
        for attempt in range(attempts):
            base = url.rstrip("/") if url else self._generate_url(turn, attempt)
            tried.append(base)
            try:
                async with session.request(method, base + path, json=payload, timeout=timeout) as response:
                    body = await response.read()
                    text = body.decode(errors="replace")
                    if response.status >= 500:
                        raise _Retryable(f"HTTP {response.status}: {_message(text)}")
                    if response.status == UNAUTHORIZED_STATUS:
                        raise RolloutError(f"{method} {base}{path}: HTTP 401: the server refused this run's API key "
                                           f"({'a wrong key' if self._headers else 'none sent'}); give external "
                                           f"servers' key in ${API_KEY_ENV} (or rollout.api_key)")  # fmt: skip
                    if response.status >= 400:
                        raise RolloutError(f"{method} {base}{path}: HTTP {response.status}: {_message(text)}")
                    reply = _json_or_text(text)
                    if check is not None:
                        check(reply)
                    return reply
            except RolloutError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, _Retryable, OSError) as error:
                last_error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                if isinstance(error, asyncio.TimeoutError):
                    last_error = f"no reply within {timeout.total:g}s"
                if not isinstance(error, (_Retryable, asyncio.TimeoutError)):  # no connection: is the server there?
                    # A health probe only where no other server could take the retry.
                    down = await self._why_down(base, probe=bool(url) or self.router_url or len(self.urls) == 1)
                    if down:
                        raise RolloutServerDown(down) from None
                # Hundreds of requests fail together when a server hiccups: one line per server and attempt.
                if (base, path, attempt) not in self._warned:
                    self._warned.add((base, path, attempt))
                    logger.warning("%s %s%s attempt %d/%d failed: %s (other requests failing the same way are "
                                   "not logged)", method, base, path, attempt + 1, attempts, last_error)  # fmt: skip
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.retry_backoff_s * 2**attempt)
        servers = ", ".join(dict.fromkeys(tried))
        raise RolloutError(f"{method} {path} failed after {attempts} attempt(s) on {servers}: {last_error}")

    async def _why_down(self, base: str, probe: bool) -> str | None:
        """Why ``base`` (a server or the router) is gone, or None if it may come back: the process that serves it
        has exited (``exit_reason``), or (``probe``) it does not answer ``/health``. One probe at a time per server,
        shared by every request that failed meanwhile."""
        if self.exit_reason is not None and (reason := self.exit_reason(base)):
            return reason
        if not probe:
            return None
        task = self._down_checks.get(base)
        if task is None or task.done() and task.result() is None:
            task = self._down_checks[base] = asyncio.ensure_future(self._health_probe(base))
        return await asyncio.shield(task)

    async def _health_probe(self, base: str) -> str | None:
        import aiohttp

        session = await self._http()
        try:
            async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status < 500:
                    return None
                problem = f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        # A killed server stops answering a moment before its parent can see it exit: wait a little for the exit
        # code, which says more than a refused connection.
        for _ in range(30 if self.exit_reason is not None else 0):
            if reason := self.exit_reason(base):
                return reason
            await asyncio.sleep(0.1)
        return f"rollout server {base} does not answer its health check ({problem}); check that it is running"

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # --- generation -----------------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                       rid: str | None = None) -> RolloutSample:  # fmt: skip
        """One response to one prompt. Without a ``rid`` nobody can abort it on purpose, so an aborted reply is
        retried; with one (see :meth:`generate_first_groups`) it comes back with finish_reason ``abort``."""

        def not_aborted(reply):
            reason = reply.get("meta_info", {}).get("finish_reason") if isinstance(reply, dict) else None
            if isinstance(reason, dict) and reason.get("type") == "abort":
                raise _Retryable(f"the server aborted the request: {reason.get('message', '')}")

        payload = generate_payload(prompt_ids, sampling) | ({"rid": rid} if rid is not None else {})
        await self._http()
        async with self._semaphore:
            reply = await self.request("POST", "/generate", payload, check=None if rid else not_aborted)
        return parse_generate_response(reply, prompt_ids)

    def _seeded(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, seed: int | None):
        """``(p, s, params)`` for response ``s`` to prompt ``p``, seeded with ``sample_seed(seed, p, s)``."""
        base = sampling.seed if seed is None else seed
        if base is None:
            base = random.SystemRandom().randrange(2**31)
        return [(p, s, replace(sampling, seed=sample_seed(base, p, s))) for p in range(len(prompts)) for s in range(n)]

    async def generate_groups(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                              seed: int | None = None) -> list[list[RolloutSample]]:  # fmt: skip
        """``n`` responses to each prompt, all in flight together; one failure cancels the rest and is raised.

        Response ``s`` to prompt ``p`` samples with seed ``sample_seed(seed, p, s)`` (``seed`` defaults to
        ``sampling.seed``; with neither, a random one: SGLang's deterministic mode would give every unseeded
        request the same seed)."""
        tasks = [asyncio.ensure_future(self.generate(prompts[p], params)) for p, _, params in
                 self._seeded(prompts, n, sampling, seed)]  # fmt: skip
        if not tasks:
            return [[] for _ in prompts]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
        if failed is not None:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise failed.exception()
        samples = [t.result() for t in tasks]
        return [samples[p * n : (p + 1) * n] for p in range(len(prompts))]

    async def generate_first_groups(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                                    keep: int, seed: int | None = None) -> tuple[list[int], list[list]]:  # fmt: skip
        """Over-sampling (slime's partial rollout): ``n`` responses to each prompt, all in flight together, until
        ``keep`` groups have all ``n`` responses finished; the rest are aborted on every server and discarded.

        Returns the kept prompts' indices and their groups, in the order the groups completed. Seeds are as in
        :meth:`generate_groups`, so a kept group is the very group that call gives for that prompt. Which groups
        are kept depends on timing. Every request gets its own ``rid`` and is aborted by that exact id: SGLang
        0.5.23's ``TokenizerManager.abort_request`` drops an id it does not hold, so a shared prefix (which its
        scheduler would match) never gets that far. An id a server does not hold is a no-op there, so each abort
        goes to every server (or the router) rather than tracking which one took the request.
        """
        if not 1 <= keep <= len(prompts):
            raise ValueError(f"keep={keep} must be between 1 and the {len(prompts)} prompts")
        prefix = f"osg-{uuid.uuid4().hex}-"
        owner: dict[asyncio.Future, tuple[int, int, str]] = {}
        for p, s, params in self._seeded(prompts, n, sampling, seed):
            rid = f"{prefix}{p}.{s}."  # the trailing dot: no id is a prefix of another
            owner[asyncio.ensure_future(self.generate(prompts[p], params, rid=rid))] = (p, s, rid)
        left = [n] * len(prompts)
        kept: list[int] = []
        pending = set(owner)
        while pending and len(kept) < keep:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: owner[t][:2]):
                if task.exception() is not None:
                    for other in pending:
                        other.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    raise task.exception()
                p = owner[task][0]
                left[p] -= 1
                if task.result().finish_reason == "abort":
                    left[p] = -1  # aborted by someone else: the group cannot complete
                if left[p] == 0:
                    kept.append(p)
        if pending:
            await self.abort_requests([owner[t][2] for t in pending])
            # Aborted requests answer at their next decode step with their partial output; those are dropped.
            replies = await asyncio.gather(*pending, return_exceptions=True)
            self.aborted_requests += sum(isinstance(r, RolloutSample) and r.finish_reason == "abort" for r in replies)
        kept = kept[:keep]
        finished = {owner[t][:2]: t for t in owner if t.done() and not t.cancelled() and t.exception() is None}
        return kept, [[finished[p, s].result() for s in range(n)] for p in kept]

    async def abort_requests(self, rids: Sequence[str]) -> None:
        """``/abort_request`` for each id on every server (SGLang's ``AbortReq``: ``rid``, ``abort_all``)."""
        targets = self.urls or [self.router_url]
        await asyncio.gather(*(self.request("POST", "/abort_request", {"rid": rid}, url=url)
                               for url in targets for rid in rids))  # fmt: skip

    # --- health and admin -----------------------------------------------------------------------------------------

    async def healthy(self, url: str, timeout_s: float = 10.0) -> bool:
        """Whether ``url`` answers ``/health_generate`` with 200 (one attempt)."""
        try:
            await self.request("GET", "/health_generate", url=url, retries=0, timeout_s=timeout_s)
            return True
        except RolloutError:
            return False

    async def flush_cache(self, url: str) -> None:
        await self.request("POST", "/flush_cache", url=url)

    async def server_info(self, url: str) -> dict:
        return await self.request("GET", "/server_info", url=url)

    async def model_info(self, url: str) -> dict:
        return await self.request("GET", "/model_info", url=url)

    async def begin_weight_update(self, url: str, timeout_s: float | None = None) -> dict:
        # Not retried: a second begin on an open session fails.
        reply = await self.request("POST", "/begin_weight_update", {}, url=url, retries=0, timeout_s=timeout_s)
        return _succeeded(reply, "begin_weight_update", url)

    async def end_weight_update(self, url: str, timeout_s: float | None = None) -> dict:
        reply = await self.request("POST", "/end_weight_update", {}, url=url, retries=0, timeout_s=timeout_s)
        return _succeeded(reply, "end_weight_update", url)

    async def update_weights_from_tensor(self, url: str, serialized_named_tensors: list[str], *,
                                         weight_version: str | None = None, flush_cache: bool = True,
                                         timeout_s: float | None = None) -> dict:  # fmt: skip
        """``serialized_named_tensors[i]``: TP rank i's payload (``load_format`` unset: a list of (name, tensor))."""
        payload = {"serialized_named_tensors": list(serialized_named_tensors), "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        reply = await self.request("POST", "/update_weights_from_tensor", payload, url=url, retries=0,
                                   timeout_s=timeout_s)  # fmt: skip
        return _succeeded(reply, "update_weights_from_tensor", url)

    async def update_weights_from_disk(self, url: str, model_path: str, *, weight_version: str | None = None,
                                       timeout_s: float | None = None) -> dict:  # fmt: skip
        payload = {"model_path": model_path, "flush_cache": True}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        reply = await self.request("POST", "/update_weights_from_disk", payload, url=url, timeout_s=timeout_s)
        return _succeeded(reply, "update_weights_from_disk", url)

    async def init_weights_update_group(self, url: str, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str,
                                        timeout_s: float | None = None) -> dict:  # fmt: skip
        # Not retried: the other side of the rendezvous is waiting for exactly one join.
        payload = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                   "world_size": world_size, "group_name": group_name, "backend": backend}  # fmt: skip
        reply = await self.request("POST", "/init_weights_update_group", payload, url=url, retries=0,
                                   timeout_s=timeout_s)  # fmt: skip
        return _succeeded(reply, "init_weights_update_group", url)

    async def update_weights_from_distributed(self, url: str, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], group_name: str,
                                              weight_version: str | None = None, flush_cache: bool = True,
                                              timeout_s: float | None = None) -> dict:  # fmt: skip
        # Not retried: the tensors are broadcast once, alongside this request.
        payload = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                   "flush_cache": flush_cache}  # fmt: skip
        if weight_version is not None:
            payload["weight_version"] = weight_version
        reply = await self.request("POST", "/update_weights_from_distributed", payload, url=url, retries=0,
                                   timeout_s=timeout_s)  # fmt: skip
        return _succeeded(reply, "update_weights_from_distributed", url)

    async def destroy_weights_update_group(self, url: str, group_name: str) -> dict:
        reply = await self.request("POST", "/destroy_weights_update_group", {"group_name": group_name}, url=url,
                                   retries=0)  # fmt: skip
        return _succeeded(reply, "destroy_weights_update_group", url)

    # Not retried: SGLang resumes a tag by removing it from the released set, so a second resume fails.
    async def release_memory_occupation(self, url: str, tags: list[str] | None = None) -> None:
        await self.request("POST", "/release_memory_occupation", {"tags": tags}, url=url, retries=0)

    async def resume_memory_occupation(self, url: str, tags: list[str] | None = None) -> None:
        await self.request("POST", "/resume_memory_occupation", {"tags": tags}, url=url, retries=0)


def _message(text: str) -> str:
    """The useful line of an error reply: SGLang's ``message`` field when it is JSON."""
    try:
        reply = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(reply, dict):
        error = reply.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:500]
        if isinstance(error, str):  # /generate's schema check: {"error": "unknown field ..."}
            return error[:500]
        if "message" in reply:
            return str(reply["message"])[:500]
    return text.strip()[:500]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _succeeded(reply: Any, endpoint: str, url: str) -> dict:
    if not isinstance(reply, dict) or not reply.get("success", False):
        raise RolloutError(f"{endpoint} on {url} failed: {_message(json.dumps(reply)) if reply else reply!r}")
    return reply


class EventLoopThread:
    """An asyncio loop on a daemon thread, so synchronous code (the trainer) can run the async client."""

    def __init__(self, name: str = "rollout-client"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
