"""How every tests/dist script ends: rank 0 writes its numbers for the pytest side (``tests/torchrun.py`` reads
them), and every rank leaves its process groups."""

from __future__ import annotations

import json

from megatron_sapo.parallel.state import destroy, is_rank0


def finish(out: str, result) -> None:
    if is_rank0():
        with open(out, "w") as f:
            json.dump(result, f)
    destroy()
