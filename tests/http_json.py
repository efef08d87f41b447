"""JSON requests to a rollout server, for tests that speak its HTTP API directly.

Servers an engine launched answer only with the run's API key (megatron_sapo/rollout/auth.py): :func:`trust`
records an engine's key for its URLs, and every request to them carries it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

KEYS: dict[str, str] = {}  # server URL -> API key


def trust(engine):
    """Send ``engine.api_key`` on every request to ``engine.urls``; returns the engine."""
    for url in engine.urls:
        if engine.api_key:
            KEYS[url.rstrip("/")] = engine.api_key
    return engine


def _headers(url: str) -> dict[str, str]:
    key = KEYS.get(url.rstrip("/"))
    return {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})


def post_json(url: str, path: str, body: dict, timeout: float = 60) -> tuple[int, dict | None]:
    """``(HTTP status, decoded reply)``; an error status is returned with its body, not raised."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers=_headers(url))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    return reply.status, json.loads(text) if text else None


def get_json(url: str, path: str, timeout: float = 60):
    request = urllib.request.Request(url + path, headers=_headers(url))
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())
