"""Which modules of a model become MoMos layers (`MoMosConfig.target_modules`), and which of them are tied."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layer import LAYER_TYPES, layer_class_for, momos_layers


def in_repeated_block(name: str) -> bool:
    """True for modules inside a block of an indexed stack (`layers.3.mlp.up_proj`, `h.0.attn.c_attn`,
    `encoder.layer.5.output.dense`), not items of a sequence themselves (`classifier.1` in
    `nn.Sequential(nn.Flatten(), nn.Linear(...))`, the last `nn.Linear` of an `nn.Sequential` model): those
    are heads or layers outside any block."""
    return any(part.isdigit() for part in name.split(".")[:-1])


def find_targets(model: nn.Module, target_modules: Optional[Union[list[str], str]]) -> list[str]:
    """Full names of the modules that `target_modules` selects (see `MoMosConfig.target_modules`), in module
    order, with the modules tied to them (see `tie_groups`)."""
    head = output_embeddings(model)
    linear = {
        name: module
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, Conv1D) and module is not head
    }
    if target_modules is None:
        targets = [name for name in linear if in_repeated_block(name)]
    elif target_modules == "all-linear":
        targets = list(linear)
    elif isinstance(target_modules, str):
        targets = [name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)]
        if not targets and re.fullmatch(r"[\w.]+", target_modules):  # a single name, as PEFT users write it
            targets = match_names(model, [target_modules], "target_modules")
    else:
        targets = match_names(model, target_modules, "target_modules")
    if not targets:
        selection = (
            "the default target_modules (linear layers inside a stack of repeated blocks; heads left out)"
            if target_modules is None
            else f"target_modules={target_modules!r}"
        )
        raise ValueError(
            f"{selection} selects no linear layer of {type(model).__name__}, whose linear layers are named like "
            f"{_leaf_names(linear)}: pass target_modules='all-linear' (every linear layer but the output "
            "embeddings), a list of names or a regex (CLI: --target_modules all-linear, --target_modules NAME ... "
            "or --target_regex REGEX)"
        )
    unsupported = [
        f"{n} ({type(model.get_submodule(n)).__name__})"
        for n in targets
        if layer_class_for(model.get_submodule(n)) is None
    ]
    if unsupported:
        raise ValueError(
            f"target_modules selects modules MoMos does not replace: {unsupported[:5]}; it replaces "
            f"{', '.join(cls.replaces.__name__ for cls in LAYER_TYPES.values())}"
        )
    tied = {name for pair in tie_groups(model, targets).items() for name in pair}
    return [name for name, _ in model.named_modules() if name in set(targets) | tied]


def tie_groups(model: nn.Module, targets: Iterable[str]) -> dict[str, str]:
    """`{follower: leader}` for every module that shares a target's weight, or whose weight a target shares
    (tied input and output embeddings): both become MoMos layers with one dictionary, mosaic and scale. The
    leader is the first of them in module order."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append(name)
    ties = {}
    for target in targets:
        group = holders.get(id(model.get_submodule(target)._parameters.get("weight")), [target])
        for name in group[1:]:
            module, leader = model.get_submodule(name), model.get_submodule(group[0])
            cls, leader_cls = layer_class_for(module), layer_class_for(leader)
            if cls is None or leader_cls is None or cls.matrix_of(module).shape != leader_cls.matrix_of(leader).shape:
                raise ValueError(
                    f"{name} shares its weight with {group[0]} (tied) and cannot follow it into MoMos form"
                )
            ties[name] = group[0]
    return ties


def block_stack(model: nn.Module, names: Iterable[str]) -> Optional[str]:
    """Name of the `nn.ModuleList` of blocks (a transformer's layers) that holds most of `names`, or None where
    none holds any: sequential calibration converts its blocks one after the other."""
    counts: dict[str, int] = {}
    for stack, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            counts[stack] = sum(name.startswith(f"{stack}.") for name in names)
    best = max(counts, key=counts.get, default=None)
    return best if best is not None and counts[best] > 0 else None


def match_names(model: nn.Module, entries: Iterable[str], option: str) -> list[str]:
    """Modules whose full name equals an entry or ends with `"." + entry`; every entry must match."""
    entries = list(entries)
    names = [name for name, _ in model.named_modules() if name]
    matched = [n for n in names if any(n == e or n.endswith("." + e) for e in entries)]
    unknown = [e for e in entries if not any(n == e or n.endswith("." + e) for n in names)]
    if unknown:
        linear = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D)}
        raise ValueError(
            f"{option} {unknown} match no module of {type(model).__name__}; "
            f"its linear layers are named like {_leaf_names(linear)}"
        )
    return matched


def output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The model's output embeddings (a language model's head), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _leaf_names(modules: dict[str, nn.Module]) -> list[str]:
    return sorted({name.rpartition(".")[2] for name in modules})


def drop_momos_ties(model: nn.Module) -> None:
    """Take the weights of MoMos layers out of the model's map of tied weights: MoMos ties those layers
    itself (one dictionary, mosaic and scale), and Transformers' tying would assign a `weight` to a MoMos
    layer. Other ties (an LM head's bias, say) stay."""
    weights = {f"{name}.weight" for name in momos_layers(model)}
    keys = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(keys.items()):
        if target in weights or source in weights:
            del keys[target]
