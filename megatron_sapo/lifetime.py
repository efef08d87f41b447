"""Everything a run starts, or makes a library start, ends with the run.

Two mechanisms:

* :func:`exit_with_parent`, for helpers we write (reward workers, the embedded rollout server): they exit once the
  trainer that started them is gone.
* :func:`reap_when_gone`, for processes libraries start on a trainer rank's behalf and that we cannot change:
  megatron-core's checkpoint writer keeps a ``multiprocessing`` Manager (spawned once, at the first save, with its
  ``resource_tracker``) for the life of the rank. torchrun ends a failed run by signalling the process groups of
  the ranks that are still alive, so when one rank is killed outright (SIGKILL, the OOM killer) nothing signals
  what that rank started: the Manager and its tracker would live on, reparented to PID 1. A small watcher process
  per rank (``python -m megatron_sapo.lifetime PID``) notes the rank's descendants while it runs and, once the rank
  is gone, kills those still there and everything left in the rank's session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def exit_with_parent(period_s: float = 2.0) -> None:
    """Exit this process once its parent is gone, even if its main thread is stuck (a hung reward function,
    a server blocked in a collective): a trainer killed with SIGKILL must not leave helpers running."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(period_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def reap_when_gone() -> subprocess.Popen:
    """Start the watcher that cleans up after this process once it has ended, however it ended."""
    # No stdout/stderr: a pipe the run's caller reads to its end must not stay open for the watcher.
    return subprocess.Popen([sys.executable, "-m", "megatron_sapo.lifetime", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True)  # fmt: skip


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """``(ppid, session, start time)`` of a live process from ``/proc``, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait is missing
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _processes() -> dict[int, tuple[int, int, int]]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _proc_stat(int(name))) is not None:
            found[int(name)] = stat
    return found


def _descendants(root: int, table: dict[int, tuple[int, int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def watch(pid: int, period_s: float = 1.0) -> None:
    """Record ``pid``'s descendants until it is gone, then SIGKILL those still running (and the rest of its
    session when it led one, as torchrun's workers do)."""
    me = os.getpid()
    session = _proc_stat(pid)[1] if _proc_stat(pid) else None
    known: dict[int, int] = {}  # pid -> start time, so that a reused pid is never hit
    while os.getppid() == pid:
        table = _processes()
        known.update({p: table[p][2] for p in _descendants(pid, table) if p != me})
        time.sleep(period_s)
    table = _processes()
    doomed = {p for p, start in known.items() if p in table and table[p][2] == start}
    if session == pid:
        doomed |= {p for p, (_, sid, _) in table.items() if sid == session}
    doomed -= {me}
    for p in sorted(doomed):
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole foreground group; the rank handles it
    watch(int(sys.argv[1]))
