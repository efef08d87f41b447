"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_sapo.checkpoint import replace_dir
from megatron_sapo.convert.mapping import hf_shapes
from megatron_sapo.errors import InputError
from megatron_sapo.models.arch import ModelArch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied from a template checkpoint next to exported weights so that transformers and SGLang load it.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HF's default shard size for save_pretrained (huggingface_hub counts a GB as 10**9 bytes)
DEFAULT_MAX_SHARD_SIZE = "5GB"


def config_dtype(hf_dir: str) -> torch.dtype | None:
    """The dtype config.json declares (``torch_dtype``, or transformers 5's ``dtype``), None when it names none."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    name = config.get("torch_dtype") or config.get("dtype")
    if name is None:
        return None
    if name not in DTYPES:
        raise InputError(
            f"{hf_dir}/config.json: torch_dtype {name!r} is not one of {sorted(DTYPES)}; pass --dtype explicitly"
        )
    return DTYPES[name]


def _safe_open(path: str, mapped: bool):
    """``mapped``: safetensors' (default) ``mmap`` backend, whose tensors are views of the page cache: nothing is
    copied until something reads them, and what is read stays file-backed memory (clean pages the kernel can drop),
    but each tensor keeps the whole file's mapping alive and every page read through it counts in the process's RSS.
    Otherwise the ``pread`` backend, which reads each tensor into memory of its own (for a reader that copies the
    tensors into parameters anyway). safetensors before 0.8 has only ``mmap``."""
    if mapped:
        return safe_open(path, framework="pt")
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:
        return safe_open(path, framework="pt")


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint folder, by name.

    ``mapped=True`` hands out tensors mapped from the files instead of read into memory (see ``_safe_open``): for
    the converter, whose checkpoint writer reads each tensor once, straight from the page cache, as ``cp`` would.
    """

    def __init__(self, hf_dir: str, *, mapped: bool = False):
        self.hf_dir = hf_dir
        self.mapped = mapped
        self._handles: dict[str, object] = {}
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    self.file_of = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError) as e:
                raise InputError(
                    f"{index_path}: unreadable index ({e}); re-download or re-export the checkpoint"
                ) from None
        elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
            self.file_of = {name: SINGLE_FILE for name in self._keys(SINGLE_FILE)}
        else:
            raise InputError(
                f"--hf-dir: no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir}; point it at a safetensors HF checkpoint"
            )

    def _keys(self, file: str) -> list[str]:
        return list(self._open(file).keys())

    def _open(self, file: str):
        if file not in self._handles:
            path = os.path.join(self.hf_dir, file)
            try:
                self._handles[file] = _safe_open(path, self.mapped)
            except (OSError, SafetensorError) as e:
                raise InputError(f"{path}: unreadable safetensors file ({e}); re-download or re-export it") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._open(self.file_of[name]).get_tensor(name)
        except SafetensorError as e:
            raise InputError(f"{self.hf_dir}: tensor {name} unreadable ({e}); re-download or re-export it") from None

    def validate(self, arch: ModelArch) -> None:
        """Every expected tensor present with its shape, nothing extra; one line naming the first problem."""
        expected = hf_shapes(arch)
        names = self.names()
        missing = sorted(set(expected) - names)
        if missing:
            raise InputError(
                f"{self.hf_dir}: missing tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; the checkpoint does not match its config.json"
            )
        extra = sorted(names - set(expected))
        if extra:
            raise InputError(
                f"{self.hf_dir}: unexpected tensor {extra[0]}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; the checkpoint does not match its config.json"
            )
        for name, shape in expected.items():
            actual = self.shape(name)
            if actual != shape:
                raise InputError(
                    f"{self.hf_dir}: tensor {name} has shape {list(actual)}, config.json implies {list(shape)}; "
                    "the checkpoint does not match its config"
                )


def write_hf_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str,
    *,
    template_dir: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    dtype: torch.dtype | None = None,
) -> tuple[int, int]:
    """Write tensors as HF writes them: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at
    most ``max_shard_bytes`` (a larger tensor gets a shard of its own) plus ``model.safetensors.index.json``.

    The folder is written as ``out_dir.tmp`` and renamed when complete (an existing ``out_dir`` survives until
    then). Tensors stream through: at most one shard is held in memory, and tensors already on the host in the
    output dtype are not copied. Returns (tensors, bytes) written.
    """
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shard_of: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = total_params = 0
    num_shards = 0

    def flush():
        nonlocal shard, shard_bytes, num_shards
        if shard:
            num_shards += 1
            save_file(shard, os.path.join(tmp, f".shard-{num_shards}.safetensors"), metadata={"format": "pt"})
            shard_of.update({name: num_shards for name in shard})
            shard, shard_bytes = {}, 0

    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += nbytes
        total_bytes += nbytes
        total_params += tensor.numel()
    flush()

    def final_name(index: int) -> str:
        return SINGLE_FILE if num_shards == 1 else f"model-{index:05d}-of-{num_shards:05d}.safetensors"

    for index in range(1, num_shards + 1):
        os.replace(os.path.join(tmp, f".shard-{index}.safetensors"), os.path.join(tmp, final_name(index)))
    if num_shards > 1:
        index = {
            "metadata": {"total_parameters": total_params, "total_size": total_bytes},
            "weight_map": {name: final_name(index) for name, index in shard_of.items()},
        }
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if template_dir is not None:
        copy_side_files(template_dir, tmp)
        if dtype is not None:
            _set_config_dtype(tmp, dtype)
    replace_dir(tmp, out_dir)
    return len(shard_of), total_bytes


def _set_config_dtype(hf_dir: str, dtype: torch.dtype) -> None:
    """config.json declares the dtype its weights were written in (the key the template uses)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        config = json.load(f)
    key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    config[key] = str(dtype).removeprefix("torch.")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_side_files(template_dir: str, out_dir: str) -> None:
    for name in HF_SIDE_FILES:
        src = os.path.join(template_dir, name)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(out_dir, name))
