"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_sapo.convert.mapping import hf_shapes
from megatron_sapo.errors import InputError
from megatron_sapo.models.qwen3_moe import Qwen3MoeArch

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


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint folder, by name."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
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
                self._handles[file] = safe_open(path, framework="pt")
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

    def validate(self, arch: Qwen3MoeArch) -> None:
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
                + "; the checkpoint does not match its config.json (or is not Qwen3-MoE)"
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
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> None:
    """Write tensors as HF safetensors shards (+ an index when there is more than one) into ``out_dir``.

    Tensors stream through: at most one shard is held in memory. Shards get their final
    ``model-0000i-of-0000n`` names once ``n`` is known.
    """
    os.makedirs(out_dir, exist_ok=True)
    shard_of: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0
    num_shards = 0

    def flush():
        nonlocal shard, shard_bytes, num_shards
        if shard:
            num_shards += 1
            save_file(shard, os.path.join(out_dir, f".shard-{num_shards}.safetensors"), metadata={"format": "pt"})
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
    flush()

    def final_name(index: int) -> str:
        return SINGLE_FILE if num_shards == 1 else f"model-{index:05d}-of-{num_shards:05d}.safetensors"

    for index in range(1, num_shards + 1):
        os.replace(os.path.join(out_dir, f".shard-{index}.safetensors"), os.path.join(out_dir, final_name(index)))
    if num_shards > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            weight_map = {name: final_name(index) for name, index in shard_of.items()}
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    if template_dir is not None:
        copy_side_files(template_dir, out_dir)


def copy_side_files(template_dir: str, out_dir: str) -> None:
    for name in HF_SIDE_FILES:
        src = os.path.join(template_dir, name)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(out_dir, name))
