"""Compact MoMos checkpoints on disk: what is written, how it is written safely, how files are checked.

A checkpoint folder is an ordinary Transformers one: `config.json` (with a `quantization_config` of
`quant_method: "momos"` listing every MoMos layer and the sha256 of every weight file), `model.safetensors`
(or shards and `model.safetensors.index.json`) holding each layer's `motifs` (once per dictionary),
`mosaic_packed` (ceil(log2 k) bits per block), `scale` and `bias`, and every other weight as usual.
Safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from .layer import MoMosLinear

QUANT_METHOD = "momos"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_PATTERN = "model{suffix}.safetensors"


def layer_specs(model: nn.Module, fit_errors: Optional[dict[str, float]] = None) -> dict[str, dict]:
    """The `quantization_config.layers` entry of every MoMos layer of `model` (dictionary owners first)."""
    owners: dict[int, str] = {}
    specs = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, MoMosLinear):
            continue
        owner = owners.setdefault(id(layer.motifs), name)
        specs[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "k": layer.k,
            "s": layer.s,
            "scale": layer.scale is not None,
            "conv1d": layer.conv1d,
            "motifs": owner,
        }
        if fit_errors and name in fit_errors:
            specs[name]["fit_error"] = fit_errors[name]
    return specs


def unique_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """`model.state_dict()` without latent weights and with each shared tensor kept once, under its first
    name (a shared dictionary under its owner layer, tied embeddings under the input embeddings); loading
    re-ties them. `state_dict` replaces `model.state_dict()` (a gathered one, for sharded models)."""
    seen: set[tuple[torch.device, int]] = set()
    unique = {}
    latents = {f"{n}.latent" for n, m in model.named_modules() if isinstance(m, MoMosLinear) and m.latent is not None}
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        if name in latents:  # training state only: the checkpoint is the mosaic
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().contiguous()
    return unique


def sha256_of(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(target: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it becomes `target`.

    Files already in `target` that the new save does not write are kept (a README, a tokenizer saved
    earlier), except stale weight files of an earlier save. If anything fails, or the process dies, before
    the swap, `target` is left exactly as it was and the staging folder is removed (or left as a hidden
    `.NAME.tmp-*` folder beside it).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save into {target}: it is a file, not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            for entry in target.iterdir():
                stale_weights = entry.name == INDEX_NAME or (entry.name.startswith("model") and entry.name.endswith(".safetensors"))
                if not (staging / entry.name).exists() and not stale_weights:
                    os.replace(entry, staging / entry.name)
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_checkpoint(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    momos_config: dict[str, Any],
    fit_errors: Optional[dict[str, float]] = None,
    tokenizer: Any = None,
    max_shard_size: Union[int, str] = "5GB",
    base_model: str = "",
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write `model` (a Transformers model holding MoMos layers) as a compact checkpoint into `directory`."""
    specs = layer_specs(model, fit_errors)
    if not specs:
        raise ValueError(f"{type(model).__name__} has no MoMos layers to save (convert it with get_momos_model)")
    state = unique_state_dict(model, state_dict)
    split = split_torch_state_dict_into_shards(state, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    with atomic_directory(directory) as staging:
        checksums = {}
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, staging / filename, metadata={"format": "pt"})
            checksums[filename] = sha256_of(staging / filename)
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        config = json.loads(model.config.to_json_string())
        config["architectures"] = [type(model).__name__]
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "momos_config": momos_config,
            "layers": specs,
            "checksums": checksums,
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and model.can_generate():
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(directory)


def safetensors_header(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the file is whole."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(f"{path.name} is corrupted or truncated: its header claims {header_len} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path.name} is corrupted: its safetensors header is not valid JSON ({err})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{path.name} is truncated or corrupted: its header describes {8 + header_len + end} bytes, the file has {size}")
    return header


def verify_files(files: list[Union[str, os.PathLike]], checksums: dict[str, str]) -> None:
    """Check every weight file of a checkpoint: present, whole, and with the sha256 recorded at save time."""
    by_name = {Path(f).name: Path(f) for f in files}
    missing = sorted(set(checksums) - set(by_name))
    if missing:
        raise ValueError(f"MoMos checkpoint is missing weight files {missing}")
    for name, path in by_name.items():
        if not path.exists():
            raise ValueError(f"MoMos checkpoint is missing weight file {name}")
        safetensors_header(path)
        if name in checksums and sha256_of(path) != checksums[name]:
            raise ValueError(f"{name} is corrupted: its sha256 differs from the one recorded in config.json at save time")


def local_weight_files(directory: Union[str, os.PathLike]) -> list[Path]:
    """The weight files a local checkpoint folder refers to (from its index when sharded)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{INDEX_NAME} is corrupted: {err!r}") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    return [directory / WEIGHTS_NAME]


def checkpoint_info(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """Sizes of a local MoMos checkpoint, read from `config.json` and the safetensors headers alone.

    Returns the MoMos settings, parameter counts, the bytes the MoMos layers take on disk next to their
    description length (`k*s*b_motif + n_blocks*ceil(log2 k)` per dictionary, plus scales), and the whole
    checkpoint's bytes next to the same model stored dense in fp16 and fp32.
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{directory} is not a MoMos checkpoint: config.json has no quantization_config with quant_method 'momos'")
    layers = quantization["layers"]
    tensors = {}
    files = local_weight_files(directory)
    for path in files:
        for name, meta in safetensors_header(path).items():
            if name != "__metadata__":
                tensors[name] = meta
    bits_of = {"F32": 32, "BF16": 16, "F16": 16, "F64": 64, "U8": 8}
    momos_names = {f"{n}.{part}" for n in layers for part in ("motifs", "mosaic_packed", "scale")}
    momos_bytes = sum(tensors[n]["data_offsets"][1] - tensors[n]["data_offsets"][0] for n in momos_names if n in tensors)
    description_bits = 0
    for name, spec in layers.items():
        blocks = spec["out_features"] * -(-spec["in_features"] // spec["s"])
        description_bits += blocks * max(0, math.ceil(math.log2(spec["k"])))
        if spec["motifs"] == name:
            description_bits += spec["k"] * spec["s"] * bits_of[tensors[f"{name}.motifs"]["dtype"]]
        if spec["scale"]:
            description_bits += spec["out_features"] * bits_of[tensors[f"{name}.scale"]["dtype"]]
    converted = sum(spec["out_features"] * spec["in_features"] for spec in layers.values())
    other = sum(math.prod(meta["shape"]) for name, meta in tensors.items() if name not in momos_names)
    return {
        "base_model": quantization.get("base_model", ""),
        "architecture": (config.get("architectures") or ["?"])[0],
        "momos_config": quantization["momos_config"],
        "layers": len(layers),
        "dictionaries": sum(spec["motifs"] == name for name, spec in layers.items()),
        "converted_params": converted,
        "other_params": other,
        "bits_per_weight": description_bits / converted,
        "description_length_bytes": description_bits / 8,
        "momos_bytes_on_disk": momos_bytes,
        "checkpoint_bytes": sum(p.stat().st_size for p in files),
        "dense_fp32_bytes": 4 * (converted + other),
        "dense_fp16_bytes": 2 * (converted + other),
    }


def format_info(info: dict[str, Any]) -> str:
    """`checkpoint_info` as the console text of `momos-hf info`."""
    mib = 2**20
    settings = info["momos_config"]
    k = settings["k"] if settings.get("k") is not None else f"capacity {settings['capacity']}"
    return "\n".join([
        f"architecture         {info['architecture']} (base model: {info['base_model'] or 'not recorded'})",
        f"MoMos settings       k={k}, s={settings['s']}, scope={settings['motif_scope']}, init={settings['init']}, scale={settings['scale']}",
        f"MoMos layers         {info['layers']} ({info['dictionaries']} dictionaries), {info['converted_params']:,d} weights; {info['other_params']:,d} other parameters",
        f"bits per weight      {info['bits_per_weight']:.4f} (mosaic, dictionaries and scales)",
        f"MoMos layers on disk {info['momos_bytes_on_disk'] / mib:.3f} MiB = {info['momos_bytes_on_disk'] / info['description_length_bytes']:.4f}x their description length",
        f"checkpoint           {info['checkpoint_bytes'] / mib:.3f} MiB vs dense fp16 {info['dense_fp16_bytes'] / mib:.3f} MiB "
        f"({info['dense_fp16_bytes'] / info['checkpoint_bytes']:.2f}x) and fp32 {info['dense_fp32_bytes'] / mib:.3f} MiB ({info['dense_fp32_bytes'] / info['checkpoint_bytes']:.2f}x)",
    ])
