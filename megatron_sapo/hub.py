"""``model.path=Qwen/Qwen3-30B-A3B-Base``: a Hugging Face Hub id resolved to a local snapshot folder.

An id is ``org/name`` with an optional ``@revision`` (branch, tag or commit), written where a folder is expected and
no such folder exists. It resolves with ``huggingface_hub.snapshot_download`` into the HF cache (``HF_HOME``,
``HF_HUB_CACHE``): from the cache when the snapshot is there (always, with ``HF_HUB_OFFLINE=1``), else downloaded
once per node: the node's processes take a file lock in the cache in turn, the first downloads (with a progress bar
on local rank 0) and the others find it cached. Only what a run reads comes down: config, tokenizer and
safetensors weights (:data:`MODEL_FILES`), never ``*.bin``/``*.pt``/``*.gguf`` copies of the same weights.
Every consumer after config loading (conversion, the rollout servers' ``--model-path``, the memory plan) is given
the snapshot's folder. Each way it can fail is one :class:`~megatron_sapo.errors.InputError` line naming the id,
the cache folder and the fix, raised before any process group or server exists.
"""

from __future__ import annotations

import os
import re

from megatron_sapo.errors import InputError

# org/name[@revision]; the Hub's own rule for names: letters, digits, '-', '_', '.', not starting with '-' or '.'.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")

# What the trainer, the converter and the rollout servers read from a model folder.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
CONFIG_FILES = ["config.json", "generation_config.json"]  # enough for the memory plan


def parse_hub_id(path: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``path`` names a Hub model rather than a folder, else None."""
    if not path or os.path.exists(path) or path.startswith(("/", ".", "~")):
        return None
    match = HUB_ID.fullmatch(path)
    return (match["repo"], match["revision"]) if match else None


def resolve_model_path(path: str, *, field: str = "model.path", config_only: bool = False) -> str:
    """The local folder for ``path``: itself when it is not a Hub id, else the cached (or downloaded) snapshot.
    ``config_only``: the config files alone (the memory planner on a machine that will not train)."""
    parsed = parse_hub_id(path)
    if parsed is None:
        return path
    repo_id, revision = parsed
    from filelock import FileLock
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars

    cache = constants.HF_HUB_CACHE
    where = f"(HF cache: {cache})"
    patterns = CONFIG_FILES if config_only else MODEL_FILES
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        disable_progress_bars()  # one bar per node
    def cached() -> str | None:
        try:
            return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
        except LocalEntryNotFoundError:  # not cached (or only in part)
            return None

    try:
        found = cached()  # without the lock first: a read-only cache that has the snapshot needs nothing written
        if found:
            return found
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"{field}={path}: not in the HF cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading it; "
                f"download it once where the Hub is reachable (hf download {repo_id}), or unset HF_HUB_OFFLINE"
            )
        os.makedirs(os.path.join(cache, ".locks"), exist_ok=True)
        lock = FileLock(os.path.join(cache, ".locks", f"megatron_sapo--{repo_id.replace('/', '--')}.lock"))
        with lock:  # the node's first process downloads; the others wait here and find it cached
            return cached() or snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except InputError:
        raise
    except GatedRepoError:
        raise InputError(
            f"{field}={path}: {repo_id} is gated on the Hub {where}; accept its terms on "
            f"{constants.ENDPOINT}/{repo_id} and give this run a token (HF_TOKEN, or hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{field}={path}: no model {repo_id} on the Hub {constants.ENDPOINT} (or it is private) and no folder of "
            f"that name {where}; check the id, pass a local folder, or give a token (HF_TOKEN) for a private model"
        ) from None
    except RevisionNotFoundError:
        raise InputError(
            f"{field}={path}: {repo_id} has no revision {revision!r} on the Hub {where}; use a branch, tag or commit "
            "it has"
        ) from None
    except LocalEntryNotFoundError as error:  # the Hub did not answer and the cache lacks the snapshot
        cause = error.__cause__ or error
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".rstrip(": ")
        raise InputError(
            f"{field}={path}: the Hub {constants.ENDPOINT} cannot be reached ({reason[:200]}) and {repo_id} is not "
            f"in the HF cache ({cache}); check the network (or HF_ENDPOINT), or download it where the Hub is reachable"
        ) from None
    except ValueError as error:  # huggingface_hub's HFValidationError: an id the Hub does not allow
        raise InputError(f"{field}={path}: not a folder, and not a valid Hub id ({error}); pass a local folder or "
                         "org/name[@revision]") from None  # fmt: skip
    except Exception as error:  # noqa: BLE001 (HTTP, proxy, disk, an id the Hub rejects: all one line)
        text = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        raise InputError(f"{field}={path}: downloading {repo_id} from {constants.ENDPOINT} failed ({text}) {where}; "
                         "check the network and the free space of the cache, then run again") from None  # fmt: skip
