"""Scoring responses in a pool of worker processes, with a per-response timeout.

A reward function is user code: it may raise, return garbage, or hang in pure Python. Only a process can be
stopped from outside without its cooperation (signals only reach a process's main thread, and the trainer may
call from any thread), so responses are scored by ``reward.num_workers`` processes that are started once and
reused every step. Each worker scores one response at a time and the trainer side knows when each response
started, so a response past ``reward.timeout_s`` gets reward 0 and its worker is killed and replaced while the
other workers carry on. A response whose function raises or returns something that is not a finite number also
gets 0. Both are counted in the returned metrics and logged; neither stops training.

Workers are fresh interpreters (``python -c``, not ``multiprocessing``): ``fork`` is unsafe under CUDA and
threads, and ``spawn`` re-imports the trainer's ``__main__`` module (torch, Megatron) in every worker. They import
only the reward function, report ready, and talk to the trainer over a socket pair; a response's clock starts
when a ready worker takes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import astuple, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Sequence

from megatron_sapo.errors import InputError
from megatron_sapo.lifetime import exit_with_parent
from megatron_sapo.rewards.config import RewardConfig
from megatron_sapo.rewards.registry import (
    RewardSample,
    load_reward_function,
    reward_function_spec,
    score_of,
    split_function_spec,
)

logger = logging.getLogger(__name__)

# A worker that has not loaded the reward function after this long is broken, not slow.
STARTUP_TIMEOUT_S = 300.0
_MAX_ERROR_CHARS = 400
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WORKER_COMMAND = "import sys; from megatron_sapo.rewards.workers import worker_main; worker_main(int(sys.argv[1]))"


@dataclass
class _Tally:
    """What went wrong during one ``compute_rewards`` call."""

    errors: dict[int, str] = field(default_factory=dict)  # response index -> one-line error
    timeouts: list[int] = field(default_factory=list)
    restarts: int = 0


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    ready: bool = False
    sample: int | None = None  # index of the response being scored
    deadline: float = float("inf")  # when the response (or, before ready, the start-up) has taken too long


class RewardManager:
    """Scores batches of responses with the configured reward function; see the module docstring."""

    def __init__(self, config: RewardConfig):
        """Start the workers and wait until each has loaded the reward function, so that a bad function fails
        here, at the trainer's start, as one InputError line. The trainer process never imports it (a reward
        module may load a model), except with ``num_workers=0``."""
        self.config = config
        self.spec = reward_function_spec(config)
        self._field = "reward.custom_function" if config.type == "custom" else "reward.type"
        split_function_spec(self.spec, self._field)
        self._workers: list[_Worker] = []
        self.function = None
        if config.num_workers == 0:
            logger.warning("reward.num_workers=0: rewards run in the trainer process; reward.timeout_s is not enforced")
            self.function = load_reward_function(self.spec, self._field)
        else:
            self._start()

    def _start(self) -> None:
        while len(self._workers) < self.config.num_workers:
            self._workers.append(self._start_worker())
        tally = _Tally()
        while not all(worker.ready for worker in self._workers):
            self._poll([], tally)

    def compute_rewards(self, samples: Sequence[RewardSample | tuple]) -> tuple[list[float], dict[str, float]]:
        """Score every sample. Returns the scores (0 for failures) and counts for the step's metrics."""
        samples = [s if isinstance(s, RewardSample) else RewardSample(*s) for s in samples]
        start = time.monotonic()
        scores = [0.0] * len(samples)
        tally = _Tally()
        if self.config.num_workers == 0:
            self._score_in_process(samples, scores, tally)
        elif samples:
            self._score_in_workers(samples, scores, tally)
        info = {
            "num_samples": len(samples),
            "num_errors": len(tally.errors),
            "num_timeouts": len(tally.timeouts),
            "num_worker_restarts": tally.restarts,
            "time_s": time.monotonic() - start,
        }
        if tally.errors or tally.timeouts:
            first = min(tally.errors) if tally.errors else None
            logger.warning(
                "reward: %d of %d responses raised or returned a bad value and %d timed out (> reward.timeout_s=%g); "
                "they score 0.%s",
                len(tally.errors),
                len(samples),
                len(tally.timeouts),
                self.config.timeout_s,
                f" First error, response {first}: {tally.errors[first]}" if first is not None else "",
            )
        return scores, info

    def close(self) -> None:
        """Stop the workers (idle ones exit on their own; the rest are killed)."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for worker in self._workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._kill(worker)
        self._workers = []

    def __enter__(self) -> RewardManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _score_in_process(self, samples: list[RewardSample], scores: list[float], tally: _Tally) -> None:
        for i, sample in enumerate(samples):
            try:
                scores[i] = score_of(self.function(**sample.call_kwargs()))
            except (Exception, SystemExit) as e:
                tally.errors[i] = describe_error(e)

    def _score_in_workers(self, samples: list[RewardSample], scores: list[float], tally: _Tally) -> None:
        while len(self._workers) < self.config.num_workers:
            self._workers.append(self._start_worker())
        pending = deque(range(len(samples)))
        while pending or any(worker.sample is not None for worker in self._workers):
            for slot in range(len(self._workers)):
                while pending and self._workers[slot].ready and self._workers[slot].sample is None:
                    self._dispatch(slot, pending, samples, tally)
            if any(worker.sample is not None or not worker.ready for worker in self._workers):
                self._poll(scores, tally)

    def _poll(self, scores: list[float], tally: _Tally) -> None:
        """Wait for the next message or deadline among busy and starting workers, and act on what arrived."""
        waiting = [worker for worker in self._workers if worker.sample is not None or not worker.ready]
        timeout = max(0.0, min(worker.deadline for worker in waiting) - time.monotonic())
        readable = wait([worker.conn for worker in waiting], timeout=timeout)
        for slot, worker in enumerate(self._workers):
            if worker.conn in readable:
                self._receive(slot, scores, tally)
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            if worker.deadline > now:
                continue
            if not worker.ready:
                self.close()
                raise RuntimeError(f"reward worker did not load {self.spec} within {STARTUP_TIMEOUT_S:.0f} s")
            tally.timeouts.append(worker.sample)
            self._replace(slot, tally)

    def _dispatch(self, slot: int, pending: deque, samples: list[RewardSample], tally: _Tally) -> None:
        worker, index = self._workers[slot], pending.popleft()
        try:
            worker.conn.send((index, samples[index].call_kwargs()))
        except OSError:
            # The worker died while idle: score the response on its replacement.
            pending.appendleft(index)
            self._replace(slot, tally)
            return
        except Exception as e:  # the sample does not pickle
            tally.errors[index] = describe_error(e)
            return
        worker.sample, worker.deadline = index, time.monotonic() + self.config.timeout_s

    def _receive(self, slot: int, scores: list[float], tally: _Tally) -> None:
        worker = self._workers[slot]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            try:
                code = worker.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
            if not worker.ready:
                self.close()
                raise RuntimeError(f"reward worker exited with code {code} while loading {self.spec}") from None
            if worker.sample is not None:
                tally.errors[worker.sample] = f"the reward worker died (exit code {code})"
            self._replace(slot, tally)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready, worker.deadline = True, float("inf")
        elif kind == "load_error":
            self.close()
            raise InputError(message[1])
        else:
            _, index, value = message
            if kind == "ok":
                scores[index] = value
            else:
                tally.errors[index] = value
            worker.sample, worker.deadline = None, float("inf")

    def _start_worker(self) -> _Worker:
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()  # the worker holds its end; closing ours lets us see EOF when it dies
        conn = Connection(ours.detach())
        # The worker imports what the trainer can: same sys.path (so "module:function" specs resolve alike).
        conn.send((self.spec, self._field, list(sys.path)))
        return _Worker(process, conn, deadline=time.monotonic() + STARTUP_TIMEOUT_S)

    def _replace(self, slot: int, tally: _Tally) -> None:
        self._kill(self._workers[slot])
        self._workers[slot] = self._start_worker()
        tally.restarts += 1

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()
        worker.conn.close()


def worker_main(fd: int) -> None:
    """A worker's life: load the reward function, then score one response per message until told to stop."""
    # Ctrl-C goes to the whole process group; the trainer handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    conn = Connection(fd)
    spec, field_name, sys_path = conn.recv()
    sys.path[:] = sys_path
    try:
        function = load_reward_function(spec, field_name)
    except InputError as e:
        conn.send(("load_error", str(e)))
        return
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the trainer is gone
            return
        if task is None:
            return
        index, kwargs = task
        try:
            reply = ("ok", index, score_of(function(**kwargs)))
        except (Exception, SystemExit) as e:
            reply = ("error", index, describe_error(e))
        conn.send(reply)


def describe_error(error: BaseException) -> str:
    """``ValueError: message (file.py:12)``: the error and the innermost frame that raised it, on one line."""
    text = f"{type(error).__name__}: {error}"
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        text += f" ({frames[-1].filename}:{frames[-1].lineno})"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


_shared_managers: dict[tuple, RewardManager] = {}


def compute_rewards(
    samples: Sequence[RewardSample | tuple], config: RewardConfig
) -> tuple[list[float], dict[str, float]]:
    """Score ``samples`` (``RewardSample`` or ``(response, label[, data_source[, extra_info]])``).

    The workers for a given config are started on the first call and reused by every later one; they stop at
    exit. Hold a :class:`RewardManager` instead to choose when they start and stop.
    """
    key = astuple(config)
    if key not in _shared_managers:
        _shared_managers[key] = RewardManager(config)
    return _shared_managers[key].compute_rewards(samples)


@atexit.register
def _close_shared_managers() -> None:
    for manager in _shared_managers.values():
        manager.close()
    _shared_managers.clear()
