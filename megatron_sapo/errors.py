"""The two exception types a user sees as one line instead of a traceback.

``InputError``: bad input (config, layout, data, checkpoint). Its message names the offending field and says how
to fix it; entry points print ``error: <message>`` and exit with status 2, before any heavy work starts.
``RunError``: the run failed later for a reason outside the code (a dead rollout server, a full disk); exit 1.
"""


class InputError(ValueError):
    """Bad config, layout, data or checkpoint; the message names the field and the fix."""


class RunError(RuntimeError):
    """The run cannot go on (a rollout server died, a checkpoint could not be written, ...).

    Raised on every rank with the same one-line message that says what happened and what to do; the entry point
    prints it once, on rank 0, as ``error: <message>`` and exits with status 1. ``only_this_rank`` marks a failure
    that this rank alone knows of while the others wait for it in a collective (megatron-core 0.19's checkpoint
    writer threads raise on their own rank): that rank prints it, at once."""

    def __init__(self, message: str, *, only_this_rank: bool = False):
        super().__init__(message)
        self.only_this_rank = only_this_rank
