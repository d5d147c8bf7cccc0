"""Compact MoMos checkpoints on disk: the format, a save that never loses anything, and the checks a load
makes before any weight is used.

Format (version 3). A checkpoint folder holds:
- `config.json`: the model's config, its `dtype` (storage dtype of the untouched weights), and a
  `quantization_config` with `quant_method: "momos"`, `format_version`, `momos_config`, one `LayerSpec` per
  MoMos layer (with its dictionary's storage format, `momos_hf.mosaic.DictionaryFormat`), `weights` (the weight
  file, or the index of the shards) and `checksums` (sha256 of every weight file and of the index). Its top-level
  `transformers_weights` holds `LOAD_MARKER`: Transformers reads that key as the name of the weight file, so
  without `import momos_hf` a plain `from_pretrained` stops with an error saying what to install instead of
  loading random weights; the MoMos quantizer points it at `weights`.
- `model.safetensors` (or shards `model-0000i-of-0000n.safetensors` and their index
  `model.safetensors.index.json`; saved over an earlier checkpoint, `model-momos-<id>...`): each layer's `motifs`
  (once per dictionary), `mosaic_packed` and `scale`, and every other weight. With q-bit motifs (`motif_bits`) a
  dictionary is stored as `motif_codes` (its values' grid codes, packed at q bits each) and `motif_step` (the grid's
  float32 step), decoded at load into motifs of the recorded dtype. Every file's metadata carries the sha256 of the
  quantization config, so an edited config.json is caught as surely as an edited weight file. Safetensors only:
  nothing is ever unpickled.

Earlier versions, all still read (`upgrade_quantization` maps their fields onto today's):
- 1 (commit 6bfc96e): sha256 of each weight file, but no `weights` entry (`model.safetensors`), no config digest in
  the files' metadata, no load marker; layers marked `conv1d: true/false` instead of a `kind`, no `mosaic` (no tied
  layers); `momos_config` named the fit `init` and held `max_assign_bytes`.
- 2 (commit 33f4807): today's layout without a recorded dictionary format; from commit 913cd9d it may hold q-bit
  dictionaries (`motif_codes`, `motif_step`), which decode to float32 motifs.
- 3: the dictionary format recorded per layer; q-bit dictionaries load in the recorded dtype.

Saving. `config.json` is the commit point. New weight files take Transformers' usual names where the folder has none
of them (a new folder, as for Trainer's checkpoints), else fresh ones, so they never overwrite those the current
config.json refers to; the new config.json replaces the old one in one rename; only then are the previous save's
weight files (the ones its config.json lists) removed. A journal written before any file records what the save
creates and what it will remove, so the next save into the folder, or the next load from it, rolls back or completes
a save that was killed. A lock on the folder makes concurrent saves take turns. Files the save did not write are
never moved or deleted, and a folder holding another kind of model is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import MoMosConfig
from ..layer import LayerSpec, momos_layers
from ..mosaic import DictionaryFormat

QUANT_METHOD = "momos"
FORMAT_VERSION = 3
UNSIGNED_VERSION = 1  # the last version whose weight files carry no config digest
LOAD_MARKER = (
    "this is a MoMos checkpoint: run `pip install momos-hf`, then `import momos_hf` before "
    "from_pretrained (transformers_weights is not a file name here)"
)
WEIGHTS_PREFIX = "model-momos-"
INDEX_SUFFIX = ".safetensors.index.json"
JOURNAL_NAME = ".momos-save.json"
STAGING_PREFIX = ".momos-save-"
STAGING_NAME = re.compile(r"\.momos-save-[0-9a-f]{12}")
# The only names a save ever removes: weight files and indexes in the two naming schemes above.
WEIGHT_FILE_NAME = re.compile(r"model(-momos-[0-9a-f]{12})?(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
QUANTIZATION_FIELDS = {
    "quant_method",
    "format_version",
    "base_model",
    "momos_config",
    "layers",
    "weights",
    "checksums",
}
FLOAT_DTYPES = {"F32": 32, "F16": 16, "BF16": 16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_BITS = {**FLOAT_DTYPES, "F64": 64, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "I32": 32, "I64": 64, "BOOL": 8}


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    """The spec of every MoMos layer of `model`: a shared dictionary is stored by its first layer, a tied
    layer's mosaic and scale by the layer it is tied to."""
    layers = momos_layers(model)
    names = {id(layer): name for name, layer in layers.items()}
    owners: dict[int, str] = {}
    return {
        name: layer.spec(owners.setdefault(id(layer.motifs), name), names[id(layer.leader or layer)])
        for name, layer in layers.items()
    }


def upgrade_quantization(quantization: Any) -> Any:
    """A `quantization_config` of format version 1 or 2 in today's fields (see the versions above); any other
    value is returned as it is, for `parse_quantization` to judge."""
    version = quantization.get("format_version") if isinstance(quantization, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < FORMAT_VERSION:
        return quantization
    upgraded = dict(quantization)
    momos_config = quantization.get("momos_config")
    if isinstance(momos_config, dict) and "init" in momos_config:
        renamed = {("fit" if key == "init" else key): value for key, value in momos_config.items()}
        upgraded["momos_config"] = {key: value for key, value in renamed.items() if key != "max_assign_bytes"}
    layers = quantization.get("layers")
    if isinstance(layers, dict):
        upgraded["layers"] = {name: _upgrade_layer(name, values) for name, values in layers.items()}
    upgraded.setdefault("base_model", "")
    checksums = quantization.get("checksums")
    if version == 1 and "weights" not in quantization and isinstance(checksums, dict):
        upgraded["weights"] = next(iter(checksums)) if len(checksums) == 1 else f"model{INDEX_SUFFIX}"
    return upgraded


def _upgrade_layer(name: str, values: Any) -> Any:
    if not isinstance(values, dict) or "conv1d" not in values:
        return values
    conv1d = values["conv1d"]
    kind = ("conv1d" if conv1d else "linear") if isinstance(conv1d, bool) else conv1d
    return {"kind": kind, "mosaic": name, **{key: value for key, value in values.items() if key != "conv1d"}}


def parse_quantization(quantization: Any) -> dict[str, LayerSpec]:
    """Validate a `quantization_config` dict (of any format version this library reads) against the format before
    anything is built from it; returns its layer specs. Every error names the field."""
    if not isinstance(quantization, dict):
        raise ValueError(f"quantization_config must be an object, got {type(quantization).__name__}")
    quantization = upgrade_quantization(quantization)
    unknown = set(quantization) - QUANTIZATION_FIELDS
    if unknown:
        raise ValueError(f"quantization_config has unknown fields {sorted(unknown)}")
    if quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"quantization_config.quant_method is {quantization.get('quant_method')!r}, not {QUANT_METHOD!r}"
        )
    version = quantization.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"quantization_config.format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"this checkpoint uses momos format_version {version}; this momos-hf reads versions 1 to "
            f"{FORMAT_VERSION}: upgrade momos-hf"
        )
    if not isinstance(quantization.get("base_model", ""), str):
        raise ValueError("quantization_config.base_model must be a string")
    if not isinstance(quantization.get("momos_config"), dict):
        raise ValueError("quantization_config.momos_config must be an object")
    config = MoMosConfig.from_dict(quantization["momos_config"])
    layers = quantization.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError("quantization_config.layers must list at least one MoMos layer")
    specs = {name: LayerSpec.from_dict(name, values) for name, values in layers.items()}
    for name, spec in specs.items():
        recorded = spec.dictionary is not None
        if recorded != (version >= 3):
            raise ValueError(
                f"layer {name!r} {'records' if recorded else 'lacks'} a dictionary format, which format_version "
                f"{version} {'does not have' if recorded else 'requires'}"
            )
        if recorded and spec.dictionary.q_bits != config.motif_bits:
            raise ValueError(
                f"layer {name!r} records {spec.dictionary.q_bits} bits per motif value but momos_config has "
                f"motif_bits={config.motif_bits}"
            )
        if spec.s != config.s or (config.k is not None and spec.k != config.k) or spec.scale != config.scale:
            raise ValueError(
                f"layer {name!r} (k={spec.k}, s={spec.s}, scale={spec.scale}) contradicts momos_config "
                f"(k={config.k}, s={config.s}, scale={config.scale})"
            )
        owner = specs.get(spec.motifs)
        if owner is None or owner.motifs != spec.motifs:
            raise ValueError(f"layer {name!r} uses the motifs of {spec.motifs!r}, which does not store a dictionary")
        if (owner.k, owner.s) != (spec.k, spec.s):
            raise ValueError(
                f"layer {name!r} has k={spec.k}, s={spec.s} but its dictionary {spec.motifs!r} has k={owner.k}, "
                f"s={owner.s}"
            )
        leader = specs.get(spec.mosaic)
        if leader is None or leader.mosaic != spec.mosaic:
            raise ValueError(f"layer {name!r} is tied to {spec.mosaic!r}, which does not store a mosaic")
        if owner.dictionary != spec.dictionary:
            raise ValueError(f"layer {name!r} records another dictionary format than its dictionary {spec.motifs!r}")
        same = ("in_features", "out_features", "k", "s", "scale", "motifs")
        if spec.mosaic != name and any(getattr(spec, f) != getattr(leader, f) for f in same):
            raise ValueError(
                f"layer {name!r} is tied to {spec.mosaic!r} but differs from it in shape, k, s, scale or dictionary"
            )
    weights = quantization.get("weights")
    if weights is not None and not (plain_file_name(weights) and weights.endswith((".safetensors", INDEX_SUFFIX))):
        raise ValueError(
            f"quantization_config.weights must be a .safetensors or {INDEX_SUFFIX} file name, got {weights!r}"
        )
    checksums = quantization.get("checksums")
    if checksums is not None and not (
        isinstance(checksums, dict)
        and all(
            plain_file_name(n) and isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h)
            for n, h in checksums.items()
        )
    ):
        raise ValueError("quantization_config.checksums must map file names to sha256 hex digests")
    return specs


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of a checkpoint's config.json as saved, without the two entries that cannot be in it: the
    checksums (they hash the files that carry this digest) and the load marker."""
    quantization = {key: value for key, value in config["quantization_config"].items() if key != "checksums"}
    covered = {
        **{key: value for key, value in config.items() if key != "transformers_weights"},
        "quantization_config": quantization,
    }
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_signed(header: dict[str, Any], config: dict[str, Any], name: str) -> None:
    """The weight file `name` (whose safetensors header is `header`) was saved with `config` (config.json as read):
    it carries its `config_digest`. Files of format version 1 carry no digest, and must not (a later save's files
    under a config.json edited to say version 1); early version 2 saves (before commit d31363c) digested the
    quantization config alone."""
    quantization = config["quantization_config"]
    version = quantization["format_version"]
    signature = header.get("__metadata__", {}).get("momos_config_sha256")
    if version <= UNSIGNED_VERSION:
        if signature is not None:
            raise ValueError(f"config.json says format_version {version} but {name} was saved by a later momos-hf")
        return
    digests = {config_digest(config)}
    if version == 2:
        covered = {key: value for key, value in quantization.items() if key != "checksums"}
        digests.add(hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest())
    if signature not in digests:
        raise ValueError(f"config.json is not the one {name} was saved with (edited, or from another save)")


def plain_file_name(name: Any) -> bool:
    """A name of a file directly inside the folder: no separators, no `..`, not hidden."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


def unique_state_dict(
    model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` holds: every persistent parameter and buffer of its state dict, each
    shared parameter once under its first name (a shared dictionary under its owner layer, tied embeddings
    under the input embeddings; loading re-ties them), no latent weights, no tied layer's copy of its
    leader's mosaic. `state_dict` gives the values instead (a gathered one, for sharded models): it must
    hold every one of those names, in the model's shapes, or nothing is saved."""
    layers = momos_layers(model)
    skipped = {f"{n}.latent" for n in layers} | {
        f"{n}.mosaic_packed" for n, m in layers.items() if m.leader is not None
    }
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            skipped.add(name)
    own = {name: tensor for name, tensor in model.state_dict().items() if name not in skipped}
    if state_dict is None:
        return {name: tensor.detach().contiguous() for name, tensor in own.items()}
    missing = [name for name in own if name not in state_dict]
    wrong = [name for name in own if name in state_dict and tuple(state_dict[name].shape) != tuple(own[name].shape)]
    if missing or wrong:
        raise ValueError(
            f"the state_dict to save lacks {missing[:5]}"
            if missing
            else f"the state_dict to save has other shapes than the model for {wrong[:5]}"
        )
    return {name: state_dict[name].detach().contiguous() for name in own}


def storage_dtype(state: dict[str, torch.Tensor], specs: dict[str, LayerSpec]) -> str:
    """The dtype the untouched float weights are stored in (what `dtype="auto"` loads them as)."""
    momos = {
        f"{name}.{part}" for name in specs for part in ("motifs", "scale", "motif_step")
    }  # their dtype may differ
    for name, tensor in state.items():
        if tensor.is_floating_point() and name not in momos:
            return str(tensor.dtype).removeprefix("torch.")
    return str(next(t for t in state.values() if t.is_floating_point()).dtype).removeprefix("torch.")


def stored_dictionary_formats(
    specs: dict[str, LayerSpec], config: MoMosConfig, tensors: dict[str, dict]
) -> dict[str, LayerSpec]:
    """`specs` with each layer's dictionary format: as recorded (format version 3), else the stored motifs' dtype,
    or for q-bit codes float32, the dtype they decode to. Float motifs must be stored in the recorded dtype.
    `tensors`: the checkpoint's header entries."""
    resolved = {}
    for name, spec in specs.items():
        entry = tensors.get(f"{spec.motifs}.motifs")
        stored = None if entry is None else SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if entry is not None and stored is None:
            raise ValueError(f"MoMos tensor {spec.motifs}.motifs is {entry.get('dtype')}, not a float dtype")
        dictionary = spec.dictionary or DictionaryFormat(stored or torch.float32, config.motif_bits)
        if stored is not None and stored != dictionary.dtype:
            raise ValueError(
                f"MoMos tensor {spec.motifs}.motifs is {entry['dtype']} but layer {name!r} records "
                f"{dictionary.to_dict()['dtype']} motifs"
            )
        resolved[name] = dataclasses.replace(spec, dictionary=dictionary)
    return resolved


def sha256_of(path: Union[str, os.PathLike], sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()
