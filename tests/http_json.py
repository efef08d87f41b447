"""One JSON POST to a rollout server, for tests that speak its HTTP API directly."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def post_json(url: str, path: str, body: dict, timeout: float = 60) -> tuple[int, dict | None]:
    """``(HTTP status, decoded reply)``; an error status is returned with its body, not raised."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    return reply.status, json.loads(text) if text else None
