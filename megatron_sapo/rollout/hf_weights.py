"""Write tensors named as in an HF checkpoint (hub names) into an in-memory transformers model, one at a time.

transformers 5 keeps MoE experts fused: ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj``
``[E, H, I]``, while checkpoints (and the trainer's export, and SGLang's ``load_weights``) name one tensor per
expert: ``mlp.experts.{e}.gate_proj.weight``. Its own loader (``convert_and_load_state_dict_in_model``) can only
fuse a complete set of experts at once, but a weight-update bucket may hold any subset, so this module reads
transformers' conversion table (``transformers.conversion_mapping``: a ``WeightConverter`` whose operations are
``MergeModulelist(dim=0)`` and optionally ``Concatenate(dim=d)``) and turns every hub name into the slice of the
fused parameter it fills: expert ``e`` of source pattern ``j`` is ``target[e]`` narrowed along ``d - 1`` at
``j × size``. Names the model has as-is (everything else, and all of a transformers 4.x model) are copied directly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

SAFE_NAME = re.compile(r"^[A-Za-z0-9_.*]+$")


@dataclass(frozen=True)
class _FusedRule:
    """One source pattern of a fusing converter: which hub names it takes and where they land."""

    hub: re.Pattern  # matches the hub name; groups: prefix, expert
    target: str  # fused parameter suffix, e.g. "mlp.experts.gate_up_proj"
    part: int  # index of this source among the converter's sources
    concat_dim: int | None  # dim of the per-expert tensor the sources are concatenated along


def _fused_rules(model) -> list[_FusedRule]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:  # transformers 4.x: experts are separate modules, every name exists as-is
        return []
    rules = []
    for converter in get_model_conversion_mapping(model):
        if not isinstance(converter, WeightConverter) or len(converter.target_patterns) != 1:
            continue
        ops = converter.operations
        if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
            continue
        concat_dim = None
        if len(ops) == 2 and isinstance(ops[1], Concatenate):
            concat_dim = ops[1].dim - 1  # dim of the stacked tensor minus the expert dim
        elif len(ops) != 1:
            continue
        target = converter.target_patterns[0]
        for part, source in enumerate(converter.source_patterns):
            if source.count("*") != 1 or not SAFE_NAME.match(source) or not SAFE_NAME.match(target):
                continue
            head, tail = (re.escape(piece) for piece in source.split("*"))
            rules.append(_FusedRule(re.compile(rf"^(?P<prefix>(?:.*\.)?){head}(?P<expert>\d+){tail}$"),
                                    target, part, concat_dim))  # fmt: skip
    return rules


class HFWeightWriter:
    """Resolves hub names to destinations in ``model`` and copies tensors there (casting to the model's dtype)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # Tied weights appear under both names.
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.params.update(dict(model.named_buffers(remove_duplicate=False)))
        self.rules = _fused_rules(model)

    def destination(self, name: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The tensor (a parameter or a view of a fused one) that ``name`` fills; raises ValueError if none fits."""
        if name in self.params:
            dest = self.params[name]
        else:
            dest = None
            for rule in self.rules:
                match = rule.hub.match(name)
                fused = match and self.params.get(match["prefix"] + rule.target)
                if fused is None:
                    continue
                expert = int(match["expert"])
                if expert >= fused.shape[0]:
                    raise ValueError(f"{name}: expert {expert} out of range, the model has {fused.shape[0]}")
                dest = fused[expert]
                if rule.concat_dim is not None:
                    size = shape[rule.concat_dim] if len(shape) > rule.concat_dim else 0
                    dest = dest.narrow(rule.concat_dim, rule.part * size, size)
                break
            if dest is None:
                raise ValueError(f"{name}: no such weight in {type(self.model).__name__}")
        if tuple(dest.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {list(shape)} does not fit the model's {list(dest.shape)}")
        return dest

    @torch.no_grad()
    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Check every name and shape first, then copy all; returns the number of tensors written."""
        pairs = [(self.destination(name, tensor.shape), tensor) for name, tensor in named_tensors]
        for dest, tensor in pairs:
            dest.copy_(tensor)
        return len(pairs)


def safetensors_files(folder: str) -> list[str]:
    """The checkpoint's safetensors files: those its index lists, else every ``*.safetensors`` in the folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    return [os.path.join(folder, n) for n in names]


def iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
