"""LoRA adapters on MoMos models through PEFT (the QLoRA pattern): the compact MoMos base stays frozen, small
adapters train beside it, and only the adapters are saved and shared.

PEFT finds the adapter class for a layer type it does not know in a LoRA config's custom module mapping
(`LoraConfig._register_custom_module`, its extension point for custom layers); the mapping lives on the config
object, not in the saved `adapter_config.json`, so both entry points here put it there before PEFT sees it:

    model = get_lora_model(base, LoraConfig(r=16, target_modules="all-linear"))   # base: a MoMos model
    ... train (Trainer, accelerate, the recipe) ...
    model.save_pretrained("adapter/")                                             # the adapter only
    model = load_lora(AutoModelForCausalLM.from_pretrained("momos-checkpoint/"), "adapter/")

`MoMosLoraLinear` computes `base(x) + B(A(dropout(x))) * scaling`: the base runs its own product from the
mosaic (never the dense weight), and its motifs, mosaic and scales get no gradient. Merging cannot stay exact in
MoMos form (a low-rank update does not map onto the motifs); `merge_lora` offers the two honest choices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..checkpoint.schema import QUANT_METHOD
from ..layer import MoMosLayer, assign_, momos_layers
from ..mosaic import relative_error
from ..report.card import CARD_MARKER, HUB_ID, is_generated_card, load_class_for

__all__ = ["MoMosLoraLinear", "get_lora_model", "load_lora", "merge_lora"]


class MoMosLoraLinear(nn.Module, LoraLayer):
    """LoRA on a MoMos matrix layer (`MoMosLinear`, GPT-2's `MoMosConv1D`): `base(x) + B(A(dropout(x))) * scaling`.

    `merge()` (what PEFT's `merge_and_unload` calls) merges into a dense copy of the base: exact, but the layer
    is no longer compressed; `merge_lora(..., into="motifs")` keeps MoMos form instead."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        for option, name in (
            (config.use_dora, "DoRA"),
            (config.lora_bias, "lora_bias"),
            (getattr(config, "velora_config", None), "VeLoRA"),
        ):
            if option:
                raise ValueError(
                    f"{name} is not supported on MoMos layers (it needs the dense base weight every step)"
                )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False  # the adapter works on the [out, in] matrix whatever the base's layout
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT would read `base_layer.weight`, which a MoMos layer rebuilds densely on every read
        motifs = base_layer.motifs if isinstance(base_layer, MoMosLayer) else base_layer.weight
        return motifs.device, motifs.dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) are not supported on MoMos layers")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            update = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's update of the `[out, in]` matrix: `B @ A * scaling`."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Replace the MoMos base by a dense module of the replaced type holding `W_hat + sum of updates`
        (exact; `unmerge()` brings the MoMos base back). `safe_merge` checks the result is finite first."""
        names = [
            n for n in (adapter_names or self.active_adapters) if n in self.lora_A and n not in self.merged_adapters
        ]
        if not names:
            return
        if not self.merged:
            self._momos_base = (self.base_layer,)  # a tuple: kept, but not registered as a submodule
        momos = self._momos_base[0]
        dense = momos.merge() if not self.merged else self.base_layer
        with torch.no_grad():
            matrix = momos.matrix_of(dense).float()
            for name in names:
                matrix = matrix + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(matrix).all():
                raise ValueError(f"merging adapters {names} gives non-finite weights")
            dense.weight = nn.Parameter(
                momos.module_layout(matrix).to(dense.weight.dtype).contiguous(), requires_grad=False
            )
        self.base_layer = dense
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Bring back the MoMos base that `merge()` replaced."""
        if self.merged:
            self.base_layer = self._momos_base[0]
            self.merged_adapters = []

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _with_momos_layers(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """`config` with PEFT's custom module mapping for MoMos layers, and `"all-linear"` resolved to every MoMos
    layer (PEFT's own resolution sees only `nn.Linear`/`Conv1D`) plus the dense linear layers it would pick."""
    kinds = {type(layer) for layer in momos_layers(model).values() if layer.kind in ("linear", "conv1d")}
    config._register_custom_module({kind: MoMosLoraLinear for kind in kinds})
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if module is not head and (isinstance(module, (nn.Linear, Conv1D)) or type(module) in kinds)
        }
        if not names:
            raise ValueError("target_modules='all-linear' found no linear or MoMos matrix layer in the model")
        config.target_modules = names
    return config


def write_adapter_card(folder: Union[str, os.PathLike], base_model: str, architecture: str) -> None:
    """README.md of an adapter folder: what the MoMos base is and how to load the adapter onto it (PEFT's own card
    is a blank template, and plain `PeftModel.from_pretrained` does not know MoMos layers). A README that momos-hf
    did not write is the user's and is kept byte for byte."""
    readme = Path(folder) / "README.md"
    if readme.exists() and not is_generated_card(readme):
        return
    base_is_hub_id = bool(HUB_ID.match(base_model)) and not Path(base_model).exists()
    metadata = f"base_model: {base_model}\n" if base_is_hub_id else ""
    load_class = load_class_for(architecture)
    readme.write_text(
        f"---\nlibrary_name: peft\n{metadata}tags:\n- momos\n- mosaic-of-motifs\n- lora\n---\n\n"
        f"# LoRA adapter on a MoMos base\n\n"
        f"LoRA adapters (PEFT) trained on the frozen Mosaic-of-Motifs checkpoint `{base_model}` "
        f"({architecture}). This folder holds the adapters only: load the MoMos base, then the adapter onto it "
        f"with momos-hf, which tells PEFT how to adapt MoMos layers:\n\n"
        f"```python\nfrom transformers import {load_class}\nfrom momos_hf import load_lora\n\n"
        f'base = {load_class}.from_pretrained("{base_model}")\n'
        f'model = load_lora(base, "PATH_OR_REPO_OF_THIS_ADAPTER")\n```\n\n'
        f'`momos_hf.merge_lora(model, into="dense")` merges exactly into dense layers; `into="motifs"` keeps the '
        f"compact form and reports the error of refitting the motifs.\n\n<!-- {CARD_MARKER} -->\n",
        encoding="utf-8",
    )


def _is_momos_checkpoint(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def _with_momos_card(model: PeftModel) -> PeftModel:
    """`model`, whose `save_pretrained` refuses a MoMos checkpoint's folder (the adapter's config would stop the
    base from loading) and writes `write_adapter_card` instead of PEFT's blank card (PEFT calls this hook first,
    before any file is written)."""

    def card(output_dir: str) -> None:
        if _is_momos_checkpoint(Path(output_dir)):
            raise ValueError(f"{output_dir} holds a MoMos checkpoint: save the adapter into a folder of its own")
        config = model.peft_config[model.active_adapter]
        architecture = (model.get_base_model().config.architectures or [type(model.get_base_model()).__name__])[0]
        write_adapter_card(output_dir, config.base_model_name_or_path or "the MoMos checkpoint", architecture)

    model.create_or_update_model_card = card
    return model


def check_adapter(model: nn.Module, folder: Union[str, os.PathLike]) -> None:
    """Refuse, naming the file and the problem, an adapter folder that `load_lora` cannot put on `model` whole:
    a MoMos checkpoint's folder, an unreadable adapter_config.json, a missing or damaged adapter_model.safetensors,
    a `lora_A` without its `lora_B` (or the reverse), tensors that are not floating point or not finite, or
    shapes other than the adapted layers'."""
    folder = Path(folder)
    if _is_momos_checkpoint(folder):
        raise ValueError(f"{folder} holds a MoMos checkpoint, not an adapter: adapters live in a folder of their own")
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{config_file} is not a readable adapter config: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{config_file} is not the config of a LoRA adapter (peft_type LORA)")
    try:
        tensors = load_file(weights_file)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{weights_file} cannot be read whole: {' '.join(str(err).split())}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, sep, part = key.removeprefix("base_model.model.").partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise ValueError(f"{weights_file}: tensor {key} is not a lora_A or lora_B weight")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_file}: tensor {key} is {tensor.dtype} with non-finite or non-float values")
        pairs.setdefault(module, {})[part[0]] = tensor
    if not pairs:
        raise ValueError(f"{weights_file} holds no LoRA weights")
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            (missing,) = {"A", "B"} - set(pair)
            raise ValueError(f"{weights_file}: {module} has no lora_{missing} weight")
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"{weights_file}: {module} is not a layer of the base model") from None
        a, b = pair["A"], pair["B"]
        # GPT-2's dense Conv1D keeps its weight as [in, out] and has no in_features/out_features
        in_features, out_features = (
            layer.weight.shape if isinstance(layer, Conv1D) else (layer.in_features, layer.out_features)
        )
        want_a, want_b = (a.shape[0], in_features), (out_features, a.shape[0])
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"{weights_file}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the layer "
                f"takes {in_features} inputs to {out_features} outputs"
            )


def _base_of(model: nn.Module) -> nn.Module:
    """A `MoMosModel` from `get_momos_model` adapts its Transformers model; anything else adapts itself."""
    from ..model import MoMosModel

    return model.base_model if isinstance(model, MoMosModel) else model


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """`peft.get_peft_model` on a MoMos model (loaded with `from_pretrained`, or a `MoMosModel`): LoRA adapters on
    its MoMos layers (and on any dense linear layer `config` targets); the base is frozen."""
    model = _base_of(model)
    if not momos_layers(model):
        raise ValueError("the model has no MoMos layers: use peft.get_peft_model for a dense model")
    return _with_momos_card(
        get_peft_model(model, _with_momos_layers(config, model), adapter_name=adapter_name, **kwargs)
    )


def load_lora(
    model: nn.Module, adapter: Union[str, os.PathLike], adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """`PeftModel.from_pretrained` of an adapter saved from `get_lora_model` onto a freshly loaded MoMos base, after
    checking the adapter whole (`check_adapter`; a Hub id is downloaded first)."""
    model = _base_of(model)
    if not momos_layers(model):
        raise ValueError(
            "the model has no MoMos layers: load_lora puts adapters on a MoMos base (load the MoMos "
            "checkpoint, or use peft.PeftModel.from_pretrained for a dense model)"
        )
    hub = {k: v for k, v in kwargs.items() if k in ("revision", "token")}
    folder = Path(adapter) if Path(adapter).is_dir() else Path(snapshot_download(str(adapter), **hub))
    check_adapter(model, folder)
    config = LoraConfig.from_pretrained(str(folder))
    rest = {k: v for k, v in kwargs.items() if k not in hub}
    return _with_momos_card(
        PeftModel.from_pretrained(
            model, str(folder), adapter_name=adapter_name, config=_with_momos_layers(config, model), **rest
        )
    )


def merge_lora(model: PeftModel, into: str = "dense") -> tuple[nn.Module, dict[str, float]]:
    """Merge the active adapters and remove them; returns the merged model and, per adapted MoMos layer, the
    relative error of its final weight against the exact merged one (`W_hat + B A * scaling`).

    - `into="dense"`: each adapted MoMos layer becomes a dense module with the exact merged weight (errors 0);
      the model loses those layers' compression.
    - `into="motifs"`: the layers stay MoMos with their mosaics and scales, and the motifs they use are refitted
      by least squares to the merged weights of every layer that shares them. Compact, but an update of low
      rank rarely lies in what `k` shared motifs can express: the errors say how much of it was lost.
    """
    if into not in ("dense", "motifs"):
        raise ValueError(f"into must be 'dense' or 'motifs', got {into!r}")
    adapted = {name: module for name, module in model.named_modules() if isinstance(module, MoMosLoraLinear)}
    if into == "dense":
        return model.merge_and_unload(), {name: 0.0 for name in adapted}
    targets = {}  # MoMos layer -> exact merged [out, in] matrix
    with torch.no_grad():
        for module in adapted.values():
            layer = module.get_base_layer()
            targets[layer] = layer.mosaic_weight(torch.float32) + sum(
                module.get_delta_weight(n).float() for n in module.active_adapters if n in module.lora_A
            )
    unloaded = model.unload()
    for motifs in {id(layer.motifs): layer.motifs for layer in targets}.values():
        sharing = [
            layer for layer in momos_layers(unloaded).values() if layer.motifs is motifs and layer.leader is None
        ]
        assign_(motifs, solve_shared_motifs(sharing, [targets.get(layer) for layer in sharing]))
    names = {
        layer: name.removeprefix("base_model.model.")
        for name, module in adapted.items()
        for layer in [module.get_base_layer()]
    }
    with torch.no_grad():
        return unloaded, {
            names[layer]: relative_error(target, layer.mosaic_weight(torch.float32))
            for layer, target in targets.items()
        }


def solve_shared_motifs(layers: list[MoMosLayer], targets: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """Motifs minimising `sum ||scale * motifs[mosaic] - target||^2` over `layers` (one dictionary, mosaics and
    scales fixed; a layer without a target keeps its own weight as target): each motif value is the
    scale-weighted mean of the block values assigned to it. Motifs used by no block, and a zero motif, stay."""
    motifs = layers[0].effective_motifs().detach().float()
    k, s = motifs.shape
    sums, mass = torch.zeros_like(motifs), torch.zeros_like(motifs)
    for layer, target in zip(layers, targets):
        target = layer.mosaic_weight(torch.float32) if target is None else target.float()
        out_features, in_features = target.shape
        nb = layer.mosaic.shape[1]
        blocks = torch.nn.functional.pad(target, (0, nb * s - in_features)).view(out_features, nb, s)
        scale = target.new_ones(out_features) if layer.scale is None else layer.scale.detach().float()
        present = target.new_ones(out_features, nb, s)  # padded block values are not part of the matrix
        present.view(out_features, -1)[:, in_features:] = 0
        index = layer.mosaic.long().flatten()
        sums.index_add_(0, index, (blocks * scale[:, None, None] * present).reshape(-1, s))
        mass.index_add_(0, index, (scale[:, None, None].square() * present).expand(-1, nb, s).reshape(-1, s))
    solved = torch.where(mass > 0, sums / mass.clamp(min=1e-30), motifs)
    if layers[0].zero_motif:
        solved[0] = 0.0
    return solved.to(layers[0].motifs.dtype)
