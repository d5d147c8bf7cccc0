"""The checks a load makes before any weight is used: file names, safetensors headers, checksums, tensors."""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any, Optional, Union

from ..layer import LayerSpec
from ..mosaic import index_bits
from ..packing import packed_size
from .schema import (
    DTYPE_BITS,
    FLOAT_DTYPES,
    INDEX_SUFFIX,
    QUANT_METHOD,
    check_signed,
    parse_quantization,
    plain_file_name,
    sha256_of,
    upgrade_quantization,
)


def checked_file(directory: Path, name: Any) -> Path:
    """`directory / name` after checking that `name` is a plain file name and the file is a regular one
    (symlinks are followed: the Hub cache links snapshots to blobs). Never opens anything else."""
    if not plain_file_name(name):
        raise ValueError(f"the checkpoint refers to {name!r}, which is not a file name inside its folder")
    path = directory / name
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"MoMos checkpoint is missing weight file {name}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{name} in the MoMos checkpoint is not a regular file")
    return path


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking its form and that the file is whole: every
    tensor's dtype, shape and byte range agree, and the ranges tile the data exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(
                f"{path.name} is corrupted or truncated: its header claims {header_len} bytes, the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path.name} is corrupted: its safetensors header is not valid JSON ({err})") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("__metadata__", {}), dict)
        or not all(isinstance(v, str) for v in header.get("__metadata__", {}).values())
    ):
        raise ValueError(f"{path.name} is corrupted: its safetensors header is not an object of tensors and metadata")
    end = 0
    for name, meta in sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda item: _offsets(item[1])[0] if _offsets(item[1]) else -1,
    ):
        offsets = _offsets(meta)
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if (
            offsets is None
            or meta.get("dtype") not in DTYPE_BITS
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or offsets[0] != end
            or offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BITS[meta["dtype"]] // 8
        ):
            raise ValueError(f"{path.name} is corrupted: the header entry of {name} does not describe its bytes")
        end = offsets[1]
    if 8 + header_len + end != size:
        raise ValueError(
            f"{path.name} is truncated or corrupted: its header describes {8 + header_len + end} bytes, the file "
            f"has {size}"
        )
    return header


def _offsets(meta: Any) -> Optional[tuple[int, int]]:
    offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
    if (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        return offsets[0], offsets[1]
    return None


def checkpoint_folder(name_or_path: Any, files: list[Union[str, os.PathLike]]) -> Path:
    """The folder a load reads: the one folder every resolved weight file lies in, which must be the model
    folder given to `from_pretrained` or a folder inside it (a shard index cannot point elsewhere)."""
    parents = {Path(f).parent.resolve() for f in files}
    if len(parents) != 1:
        raise ValueError("the checkpoint's weight files are not all in its folder: its shard index points elsewhere")
    root = Path(str(name_or_path)) if name_or_path else None
    if root is not None and root.is_dir() and not parents.pop().is_relative_to(root.resolve()):
        raise ValueError(f"the checkpoint's shard index points outside {root}")
    return Path(files[0]).parent


def weight_file_names(directory: Path, weights: str) -> list[str]:
    """The safetensors files of a checkpoint: `weights` itself, or the shards its index lists."""
    if not weights.endswith(INDEX_SUFFIX):
        return [weights]
    path = checked_file(directory, weights)
    try:
        names = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{weights} is corrupted: {err!r}") from None
    for name in names:
        if not (plain_file_name(name) and name.endswith(".safetensors")):
            raise ValueError(f"{weights} lists {name!r}, which is not a safetensors file inside the checkpoint folder")
    return names


def verify_checkpoint(directory: Union[str, os.PathLike], config: dict[str, Any]) -> dict[str, dict]:
    """Check a MoMos checkpoint before anything is loaded from it: every weight file (and the index) is a
    whole regular file inside the folder with the sha256 that config.json records, carries the digest of
    this very config.json, and the files hold exactly the MoMos tensors the layer specs call for, with the
    right dtypes and shapes. `config` is the folder's config.json as read. Returns the header entry of every
    tensor."""
    directory = Path(directory)
    quantization = upgrade_quantization(config.get("quantization_config"))
    specs = parse_quantization(quantization)
    checksums, weights = quantization.get("checksums"), quantization.get("weights")
    if not checksums or not weights:
        raise ValueError(
            "config.json records no checksums for its weight files: the MoMos checkpoint cannot be "
            "verified, so it is not loaded"
        )
    files = weight_file_names(directory, weights)
    uncovered = sorted({weights, *files} - set(checksums))
    if uncovered:
        raise ValueError(f"config.json records no checksum for {uncovered}: the MoMos checkpoint cannot be verified")
    if weights.endswith(INDEX_SUFFIX) and sha256_of(checked_file(directory, weights)) != checksums[weights]:
        raise ValueError(
            f"{weights} is corrupted: its sha256 differs from the one recorded in config.json at save time"
        )
    tensors: dict[str, dict] = {}
    for name in files:
        path = checked_file(directory, name)
        header = safetensors_header(path)
        if sha256_of(path) != checksums[name]:
            raise ValueError(
                f"{name} is corrupted: its sha256 differs from the one recorded in config.json at save time"
            )
        check_signed(header, config, name)
        tensors.update((key, value) for key, value in header.items() if key != "__metadata__")
    check_momos_tensors(tensors, specs, quantization["momos_config"].get("motif_bits"))
    return tensors


def check_momos_tensors(
    tensors: dict[str, dict], specs: dict[str, LayerSpec], motif_bits: Optional[int] = None
) -> None:
    """The files hold each layer's packed mosaic, each dictionary once (float motifs, or with `motif_bits` its
    packed codes and float32 step), each recorded scale, in the recorded shapes, and no MoMos tensor of a
    layer the config does not list."""
    expected = {}
    for name, spec in specs.items():
        if spec.mosaic == name:  # a tied layer stores nothing of its own
            expected[f"{name}.mosaic_packed"] = ({"U8"}, [packed_size(spec.num_blocks, index_bits(spec.k))])
            if spec.scale:
                expected[f"{name}.scale"] = (set(FLOAT_DTYPES), [spec.out_features])
        if spec.motifs == name and motif_bits is not None:
            expected[f"{name}.motif_codes"] = ({"U8"}, [packed_size(spec.k * spec.s, motif_bits)])
            expected[f"{name}.motif_step"] = ({"F32"}, [1])
        elif spec.motifs == name:
            expected[f"{name}.motifs"] = (set(FLOAT_DTYPES), [spec.k, spec.s])
    for key, (dtypes, shape) in expected.items():
        if key not in tensors:
            raise ValueError(f"MoMos checkpoint lacks the tensor {key}")
        if tensors[key].get("dtype") not in dtypes or tensors[key].get("shape") != shape:
            raise ValueError(
                f"MoMos tensor {key} is {tensors[key].get('dtype')} {tensors[key].get('shape')}; "
                f"the layer spec calls for {'/'.join(sorted(dtypes))} {shape}"
            )
    extra = sorted(
        key
        for key in tensors
        if key not in expected
        and (
            key.endswith((".motifs", ".mosaic_packed", ".motif_codes", ".motif_step"))
            or key.removesuffix(".scale") in specs
        )
    )
    if extra:
        raise ValueError(f"MoMos checkpoint holds tensors {extra[:5]} of layers its config.json does not list")


def read_checkpoint_config(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """A local folder's config.json, after checking that it describes a MoMos checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a folder")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json: it is not a model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{directory} is not a MoMos checkpoint: config.json has no quantization_config with quant_method 'momos'"
        )
    parse_quantization(quantization)
    return config
