"""Run a script under ``torchrun`` with gloo processes and read back the JSON it writes.

Distributed tests keep their multi-process work in ``tests/dist/*.py`` scripts. A script takes ``--out PATH``
(plus its own arguments), computes on every rank, and rank 0 writes a JSON of the numbers to ``PATH``; the
pytest test then asserts on those numbers against its reference, so a failure reads like any other test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

DIST_DIR = os.path.join(os.path.dirname(__file__), "dist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 600, env: dict | None = None) -> dict:
    """Run ``tests/dist/<script>`` on ``nproc`` local processes; return the JSON written by rank 0."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            os.path.join(DIST_DIR, script), "--out", out, *args,
        ]  # fmt: skip
        run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)
        if proc.returncode != 0:
            raise AssertionError(
                f"torchrun {script} {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-10000:]}"
            )
        with open(out) as f:
            return json.load(f)
