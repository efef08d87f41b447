"""A rollout server as a child process: start it, wait until it serves, stop it with everything it spawned."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from megatron_sapo.rollout.client import RolloutError

logger = logging.getLogger(__name__)


# torchrun's variables: a server started from a trainer rank must not think it is one.
TORCHRUN_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


# torch's allocator settings; torch_memory_saver (SGLang's --enable-memory-saver) raises at start-up when they ask for
# expandable_segments:True, which train.sh sets for the trainer.
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment without torchrun's variables and without ``expandable_segments`` in the
    allocator settings (the other settings stay), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    for name in ALLOC_CONF_VARIABLES:
        if name in env:
            kept = [o for o in env[name].split(",") if o.strip() and o.split(":")[0].strip() != "expandable_segments"]
            if kept:
                env[name] = ",".join(kept)
            else:
                del env[name]
    env.update(extra)
    return env


def http_status(url: str, timeout_s: float = 5.0) -> int | str:
    """The HTTP status of a GET, or the reason there was none (refused, timed out, ...)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


class ServerProcess:
    """One server process in a session of its own, its output in ``log_path``."""

    def __init__(self, argv: Sequence[str], *, url: str | None, log_path: str, env: dict | None = None):
        self.argv = list(argv)
        self.url = url  # None for a process that serves no HTTP (a non-first node of a multi-node SGLang server)
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A new session: stop() signals the whole group, so workers the server forks go with it.
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env or server_env(), start_new_session=True)  # fmt: skip
        logger.info("started %s (pid %d), log %s", " ".join(self.argv[:4]), self.process.pid, self.log_path)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid  # start_new_session made it the group leader
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlived the leader.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until_serving(servers: Sequence[ServerProcess], timeout_s: float, *, path: str = "/health_generate",
                       poll_s: float = 0.5) -> None:  # fmt: skip
    """Until every server answers ``path`` with 200; one error naming the server if one dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    pending = [s for s in servers if s.url is not None]
    last: dict[str, int | str] = {}
    while pending:
        for server in list(pending):
            for other in servers:
                if other.process is not None and not other.alive:
                    raise RolloutError(f"rollout server exited with status {other.process.returncode} while starting "
                                       f"({' '.join(other.argv[:4])} ...); last log lines of {other.log_path}:\n"
                                       f"{other.log_tail()}")  # fmt: skip
            status = http_status(server.url + path, timeout_s=max(1.0, min(10.0, deadline - time.monotonic())))
            last[server.url] = status
            if status == 200:
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            details = "; ".join(f"{s.url}: {last.get(s.url)}" for s in pending)
            raise RolloutError(f"rollout servers not serving after {timeout_s:g}s ({details}); see "
                               f"{', '.join(s.log_path for s in pending)}")  # fmt: skip
        if pending:
            time.sleep(poll_s)
