"""``python sglang_entry.py ARGS`` is ``python -m sglang.launch_server ARGS`` with the run's API key.

Run by file path under SGLang's interpreter (``rollout.sglang_python``, often a venv without megatron_sapo), so it
imports nothing of the package. The key comes in the environment (``MEGATRON_SAPO_ROLLOUT_API_KEY``, removed here
so that SGLang's children never see it) and goes to SGLang as ``--api-key`` in this process's ``sys.argv`` only,
so ``ps`` and ``/proc/<pid>/cmdline`` never show it. SGLang 0.5.23 logs its server arguments, the key among them,
at start: with a key, this process's stdout and stderr (inherited by every SGLang child) pass through a pipe that
writes them to the log with the key replaced by ``***``.
"""

import atexit
import os
import runpy
import sys
import threading

API_KEY_ENV = "MEGATRON_SAPO_ROLLOUT_API_KEY"  # = megatron_sapo.rollout.auth.API_KEY_ENV


def redact_output(secret: bytes) -> threading.Thread:
    """Route fds 1 and 2 through a pipe whose reader writes to the original stdout with ``secret`` masked."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb", buffering=0) as source:
            pending = b""
            while chunk := source.read(65536):
                pending = (pending + chunk).replace(secret, b"***")
                # A key holds no line break: what precedes the last one can be masked and written now.
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
                if not cut and len(pending) > 1 << 16:
                    cut = len(pending) - len(secret) + 1
                os.write(log, pending[:cut])
                pending = pending[cut:]
            os.write(log, pending.replace(secret, b"***"))

    thread = threading.Thread(target=pump, name="redact-api-key", daemon=True)
    thread.start()

    def drain():
        # At exit: this process lets go of the pipe, and once SGLang's children have too (launch_server kills them
        # before it returns), the pump reads to the end and writes the rest.
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log, 1)
        os.dup2(log, 2)
        thread.join(timeout=10)

    atexit.register(drain)
    return thread


def main() -> None:
    # Python put this file's folder first on the path, and rollout/sglang.py sits there: take it off, so that
    # "sglang" is SGLang.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    key = os.environ.pop(API_KEY_ENV, None)
    if key:
        redact_output(key.encode())
        sys.argv += ["--api-key", key]
    sys.argv = ["sglang.launch_server", *sys.argv[1:]]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
