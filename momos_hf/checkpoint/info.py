"""What a checkpoint holds, read from its files without building the model: sizes, description length."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Union

import torch
from safetensors import safe_open

from ..config import MoMosConfig
from ..mosaic import index_bits, num_blocks_per_row, reconstruct
from ..packing import unpack_indices
from .schema import (
    DTYPE_BITS,
    check_signed,
    parse_quantization,
    stored_dictionary_formats,
    upgrade_quantization,
)
from .verify import (
    check_momos_tensors,
    checked_file,
    read_checkpoint_config,
    safetensors_header,
    weight_file_names,
)


def checkpoint_info(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """Sizes of a local MoMos checkpoint, read from `config.json` and the safetensors headers alone.

    Returns the MoMos settings, parameter counts, the bytes the MoMos layers take on disk next to their
    description length (`k*s*b_motif + n_blocks*ceil(log2 k)` per dictionary, plus scales), and the whole
    checkpoint's bytes next to the same model stored dense in fp16 and fp32.
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    quantization = upgrade_quantization(config["quantization_config"])
    specs = parse_quantization(quantization)
    if not quantization.get("weights"):
        raise ValueError(f"{directory}: config.json names no weight file")
    files = [checked_file(directory, name) for name in weight_file_names(directory, quantization["weights"])]
    tensors, location = {}, {}
    for path in files:
        header = safetensors_header(path)
        check_signed(header, config, path.name)
        tensors.update((k, v) for k, v in header.items() if k != "__metadata__")
        location.update(dict.fromkeys(header, path))
    momos_config = MoMosConfig.from_dict(quantization["momos_config"])
    check_momos_tensors(tensors, specs, momos_config.motif_bits)
    specs = stored_dictionary_formats(specs, momos_config, tensors)
    for name, spec in specs.items():  # a q-bit dictionary is a few bytes: decode it, as a load would
        if spec.motifs == name and spec.dictionary.q_bits is not None:
            try:
                fan_in = max(other.in_features for other in specs.values() if other.motifs == name)
                stored = _read_tensors(location, name, spec.dictionary.parts)
                spec.dictionary.decode(stored, spec.k, spec.s, fan_in)
            except ValueError as err:
                raise ValueError(f"corrupted MoMos checkpoint: layer {name}: {err}") from err

    def nbytes(meta: dict) -> int:
        return meta["data_offsets"][1] - meta["data_offsets"][0]

    parts = ("motifs", "mosaic_packed", "scale", "motif_codes", "motif_step")
    momos_names = {f"{n}.{part}" for n in specs for part in parts} & set(tensors)
    description_bits = 0
    for name, spec in specs.items():
        scale_bits = DTYPE_BITS[tensors[f"{spec.mosaic}.scale"]["dtype"]] if spec.scale else 0
        description_bits += sum(spec.description_bits(name, scale_bits))
    converted = sum(spec.out_features * spec.in_features for name, spec in specs.items() if spec.mosaic == name)
    other = {name: meta for name, meta in tensors.items() if name not in momos_names}
    return {
        "base_model": quantization.get("base_model", ""),
        "architecture": (config.get("architectures") or ["?"])[0],
        "momos_config": quantization["momos_config"],
        "format_version": quantization["format_version"],
        "dtype": config.get("dtype"),
        "layers": len(specs),
        "dictionaries": sum(spec.motifs == name for name, spec in specs.items()),
        "converted_params": converted,
        "other_params": sum(math.prod(meta["shape"]) for meta in other.values()),
        "total_params": converted + sum(math.prod(meta["shape"]) for meta in other.values()),
        "other_bytes": sum(nbytes(meta) for meta in other.values()),
        "bits_per_weight": description_bits / converted,
        "description_length_bytes": description_bits / 8,
        "momos_bytes_on_disk": sum(nbytes(tensors[n]) for n in momos_names),
        "checkpoint_bytes": sum(p.stat().st_size for p in files),
        "dense_fp32_bytes": 4 * (converted + sum(math.prod(m["shape"]) for m in other.values())),
        "dense_fp16_bytes": 2 * (converted + sum(math.prod(m["shape"]) for m in other.values())),
        "fit_errors": {name: spec.fit_error for name, spec in specs.items() if spec.fit_error is not None},
    }


@torch.no_grad()
def read_leading_weights(directory: Union[str, os.PathLike], max_values: int) -> torch.Tensor:
    """The first `max_values` values of a checkpoint's MoMos matrices (layer order, float32), rebuilt from
    the motif and packed mosaic tensors of as many layers as that takes: no model is built."""
    directory = Path(directory)
    quantization = upgrade_quantization(read_checkpoint_config(directory)["quantization_config"])
    tensors, location = {}, {}
    for name in weight_file_names(directory, quantization["weights"]):
        header = safetensors_header(checked_file(directory, name))
        tensors.update((k, v) for k, v in header.items() if k != "__metadata__")
        location.update(dict.fromkeys(header, directory / name))
    specs = stored_dictionary_formats(
        parse_quantization(quantization), MoMosConfig.from_dict(quantization["momos_config"]), tensors
    )
    parts, count = [], 0
    for name, spec in specs.items():
        if count >= max_values:
            break
        if spec.mosaic != name:  # a tied layer's matrix is its leader's
            continue
        stored = _read_tensors(location, name, ("mosaic_packed",) + (("scale",) if spec.scale else ()))
        mosaic = unpack_indices(stored["mosaic_packed"], index_bits(spec.k), spec.num_blocks)
        scale = stored["scale"].float() if spec.scale else None
        stored = _read_tensors(location, spec.motifs, spec.dictionary.parts)
        motifs = spec.dictionary.decode(stored, spec.k, spec.s).float()
        matrix = reconstruct(
            motifs,
            mosaic.reshape(spec.out_features, num_blocks_per_row(spec.in_features, spec.s)),
            spec.in_features,
            scale,
        )
        parts.append(matrix.flatten()[: max_values - count])
        count += parts[-1].numel()
    return torch.cat(parts)


def _read_tensors(location: dict[str, Path], layer: str, parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors `layer.part` of a checkpoint, by part, from the files `location` maps their names to."""
    stored = {}
    for part in parts:
        with safe_open(location[f"{layer}.{part}"], "pt") as f:
            stored[part] = f.get_tensor(f"{layer}.{part}")
    return stored


def format_info(info: dict[str, Any]) -> str:
    """`checkpoint_info` as the console text of `momos-hf info`."""
    mib = 2**20
    settings = info["momos_config"]
    k = settings["k"] if settings.get("k") is not None else f"capacity {settings['capacity']}"
    return "\n".join(
        [
            f"architecture         {info['architecture']} (base model: {info['base_model'] or 'not recorded'})",
            f"MoMos settings       k={k}, s={settings['s']}, scope={settings['motif_scope']}, "
            f"fit={settings['fit']}, scale={settings['scale']}"
            + (f", motif_bits={settings['motif_bits']}" if settings.get("motif_bits") else ""),
            f"parameters           {info['total_params']:,d} ({info['converted_params']:,d} in mosaics, counted as "
            f"the dense weights they stand for; {info['other_params']:,d} other, stored as {info['dtype']})",
            f"MoMos layers         {info['layers']} ({info['dictionaries']} dictionaries)",
            f"bits per weight      {info['bits_per_weight']:.4f} (mosaic, dictionaries and scales)",
            f"MoMos layers on disk {info['momos_bytes_on_disk'] / mib:.3f} MiB = "
            f"{info['momos_bytes_on_disk'] / info['description_length_bytes']:.4f}x their description length",
            f"checkpoint           {info['checkpoint_bytes'] / mib:.3f} MiB vs dense fp16 "
            f"{info['dense_fp16_bytes'] / mib:.3f} MiB "
            f"({info['dense_fp16_bytes'] / info['checkpoint_bytes']:.2f}x) and fp32 "
            f"{info['dense_fp32_bytes'] / mib:.3f} MiB ({info['dense_fp32_bytes'] / info['checkpoint_bytes']:.2f}x)",
        ]
    )
