"""Rollout servers that answer only this run: SGLang's API key, as its 0.5.23 HTTP server enforces it.

``sglang.launch_server --api-key K`` (``srt/utils/auth.py``, ``add_api_key_middleware``) refuses every request
without ``Authorization: Bearer K`` (scheme case-insensitive, the key compared in constant time) with status 401 and
the JSON body ``{"error": "Unauthorized"}``, except ``OPTIONS`` requests and paths starting with ``/health``,
``/ready`` or ``/metrics`` (probes). With only ``--api-key`` set (no ``--admin-api-key``) that covers generation,
weight updates, memory release and the rest alike. The embedded server applies the same rule
(:func:`api_key_middleware`); the conformance test holds both to the wheel's source.

Launched servers (``rollout.backend`` embedded or sglang) get a fresh key per run (:func:`new_api_key`), handed to
the server process in the environment (:data:`API_KEY_ENV`, removed there before anything else runs), never on a
command line, in a log or in the saved config. ``external`` servers take ``rollout.api_key`` or, better, the same
environment variable on the trainer.
"""

from __future__ import annotations

import os
import secrets

API_KEY_ENV = "MEGATRON_SAPO_ROLLOUT_API_KEY"
OPEN_PATH_PREFIXES = ("/health", "/ready", "/metrics")  # SGLang lets probes through without a key
UNAUTHORIZED_STATUS = 401
UNAUTHORIZED_BODY = {"error": "Unauthorized"}


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def run_api_key(configured: str | None, *, launched: bool) -> str | None:
    """The key this run's servers want: ``rollout.api_key`` when set; else, for servers this run launches, a new one
    (never one left in the environment by an earlier run), and for external servers :data:`API_KEY_ENV` (None when
    they have none)."""
    if configured:
        return configured
    return new_api_key() if launched else (os.environ.get(API_KEY_ENV) or None)


def authorization_header(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def allowed(method: str, path: str, authorization: str | None, api_key: str | None) -> bool:
    """SGLang 0.5.23's ``decide_request_auth`` for a server with ``--api-key`` and no admin key."""
    if not api_key or method == "OPTIONS" or path.startswith(OPEN_PATH_PREFIXES):
        return True
    scheme, space, token = (authorization or "").partition(" ")
    return bool(space) and scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), api_key.encode())


def api_key_middleware(api_key: str | None):
    """aiohttp middleware of the embedded server: :func:`allowed`, else SGLang's 401 reply."""
    from aiohttp import web

    @web.middleware
    async def check_api_key(request, handler):
        if not allowed(request.method, request.path, request.headers.get("Authorization"), api_key):
            return web.json_response(UNAUTHORIZED_BODY, status=UNAUTHORIZED_STATUS)
        return await handler(request)

    return check_api_key
