"""Helper processes (reward workers, the embedded rollout server) end when the trainer that started them does."""

from __future__ import annotations

import os
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
