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
  ``--enable-deterministic-inference``; the embedded server always does.
- ``/health_generate``, ``/flush_cache``, ``/update_weights_from_disk`` (``model_path``),
  ``/init_weights_update_group`` (``master_address``, ``master_port``, ``rank_offset``, ``world_size``,
  ``group_name``, ``backend``), ``/update_weights_from_distributed`` (``names``, ``dtypes``, ``shapes``,
  ``group_name``, ``flush_cache``), ``/destroy_weights_update_group``, ``/release_memory_occupation`` and
  ``/resume_memory_occupation`` (``tags``), ``/get_server_info``, ``/get_model_info``.

Failures: a connection error, a timeout or a 5xx reply is retried (``max_retries`` times, backoff doubling, on the
next server in turn); a 4xx reply is a bad request and fails at once. Either way the caller gets one
:class:`RolloutError` naming the endpoint, the servers tried and the last error. Every attempt is bounded by the
request timeout, so nothing waits longer than ``(max_retries + 1) × (request_timeout_s + backoff)``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The rollout servers could not do what was asked (after the retries that make sense)."""


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
    return {"input_ids": [int(t) for t in prompt_ids], "sampling_params": sampling.to_sglang(), "return_logprob": True}


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
                 request_timeout_s: float = 600.0, max_retries: int = 3, retry_backoff_s: float = 1.0):  # fmt: skip
        if not urls and not router_url:
            raise ValueError("RolloutClient needs server URLs or a router URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.concurrency = concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._turn = itertools.count()
        self._session = None
        self._semaphore: asyncio.Semaphore | None = None

    # --- plumbing -------------------------------------------------------------------------------------------------

    async def _http(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency))
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
                logger.warning("%s %s%s attempt %d/%d failed: %s", method, base, path, attempt + 1, attempts,
                               last_error)  # fmt: skip
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.retry_backoff_s * 2**attempt)
        servers = ", ".join(dict.fromkeys(tried))
        raise RolloutError(f"{method} {path} failed after {attempts} attempt(s) on {servers}: {last_error}")

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # --- generation -----------------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> RolloutSample:
        """One response to one prompt."""

        def not_aborted(reply):
            reason = reply.get("meta_info", {}).get("finish_reason") if isinstance(reply, dict) else None
            if isinstance(reason, dict) and reason.get("type") == "abort":
                raise _Retryable(f"the server aborted the request: {reason.get('message', '')}")

        await self._http()
        async with self._semaphore:
            reply = await self.request("POST", "/generate", generate_payload(prompt_ids, sampling), check=not_aborted)
        return parse_generate_response(reply, prompt_ids)

    async def generate_groups(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                              seed: int | None = None) -> list[list[RolloutSample]]:  # fmt: skip
        """``n`` responses to each prompt, all in flight together; one failure cancels the rest and is raised.

        Response ``s`` to prompt ``p`` samples with seed ``sample_seed(seed, p, s)`` (``seed`` defaults to
        ``sampling.seed``; with neither, the servers draw seeds of their own)."""
        base = sampling.seed if seed is None else seed
        tasks = []
        for p, prompt in enumerate(prompts):
            for s in range(n):
                params = replace(sampling, seed=None if base is None else sample_seed(base, p, s))
                tasks.append(asyncio.ensure_future(self.generate(prompt, params)))
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

    async def get_server_info(self, url: str) -> dict:
        return await self.request("GET", "/get_server_info", url=url)

    async def get_model_info(self, url: str) -> dict:
        return await self.request("GET", "/get_model_info", url=url)

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

    async def release_memory_occupation(self, url: str, tags: list[str] | None = None) -> None:
        await self.request("POST", "/release_memory_occupation", {"tags": tags}, url=url)

    async def resume_memory_occupation(self, url: str, tags: list[str] | None = None) -> None:
        await self.request("POST", "/resume_memory_occupation", {"tags": tags}, url=url)


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
