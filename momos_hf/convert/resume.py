"""Resumable sequential conversion: each block's fit is saved as it finishes and reused by a rerun.

A block's file (`block-<i>.safetensors` in the resume folder) holds the motifs, mosaic, scale and fit error of
each of its layers, under a key made of everything the fit depended on (`conversion_key`: the MoMos settings,
the model's config and every parameter and buffer, the calibration batches) and the block's index. A file is
reused only when its key matches, its contents match the digest stored with them, and every tensor has the
shape, dtype and range the layer needs; otherwise the block is fitted again and its file replaced. Files are
written under a temporary name and renamed, so a killed run leaves the old file or the new one, never half of
one (a run killed while writing leaves its `.block-<i>.safetensors.<pid>.partial`, which nothing reads).
Nothing else in the folder is read, moved or deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..mosaic import index_dtype, num_blocks_per_row

logger = logging.get_logger(__name__)

Fitted = dict[str, tuple[nn.Parameter, torch.Tensor, Optional[nn.Parameter], float]]


def tensor_digest(tensors: Iterable[torch.Tensor], seed: str = "") -> str:
    """sha256 of `seed` and each tensor's dtype, shape and bytes, in order."""
    digest = hashlib.sha256(seed.encode())
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def conversion_key(settings: Mapping[str, Any], model: nn.Module, batches: list[Mapping[str, Any]]) -> str:
    """The key of a whole conversion: its settings, the model (its config, and every parameter and buffer by
    name) and the calibration batches (every tensor by name)."""
    config = getattr(getattr(model, "config", None), "to_dict", dict)()
    state = sorted((name, t) for name, t in [*model.named_parameters(), *model.named_buffers()] if t is not None)
    inputs = [
        (f"batch {i} {key}", value)
        for i, batch in enumerate(batches)
        for key, value in sorted(batch.items())
        if torch.is_tensor(value)
    ]
    names = [name for name, _ in state + inputs]
    seed = json.dumps({"settings": settings, "config": config, "tensors": names}, sort_keys=True, default=str)
    return tensor_digest([t for _, t in state + inputs], seed)


class BlockResults:
    """The fits of converted blocks in `folder` (created if needed) for the conversion with key `key`."""

    def __init__(self, folder: str | os.PathLike, key: str) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"resume folder {folder} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key

    def block_key(self, index: int) -> str:
        return tensor_digest([], f"{self.key} block {index}")

    def path(self, index: int) -> Path:
        return self.folder / f"block-{index}.safetensors"

    def load(self, index: int, expected: Mapping[str, tuple[int, int, int, int, bool]]) -> Optional[Fitted]:
        """Block `index`'s fits if its file is there, has the current key and holds, for each `name -> (out,
        in, k, s, scale)` of `expected`, valid tensors; else None (with a warning when a file was rejected)."""
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("key") != self.block_key(index):
                return None  # another conversion's block: fit again
            if meta.get("digest") != _content_digest(tensors, meta.get("errors", "")):
                raise ValueError("its contents do not match their digest")
            errors = json.loads(meta["errors"])
            parts = {f"{name}.{part}" for name in expected for part in ("motifs", "mosaic", "scale")}
            if not isinstance(errors, dict) or set(errors) != set(expected) or set(tensors) - parts:
                raise ValueError("it holds other layers than the block's")
            return {name: self._layer(name, tensors, errors[name], *shape) for name, shape in expected.items()}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            logger.warning(f"MoMos: {path} is not a valid saved block ({err}); fitting the block again")
            return None

    @staticmethod
    def _layer(
        name: str,
        tensors: dict[str, torch.Tensor],
        error: Any,
        out_features: int,
        in_features: int,
        k: int,
        s: int,
        scale: bool,
    ) -> tuple:
        motifs, mosaic, scales = tensors[f"{name}.motifs"], tensors[f"{name}.mosaic"], tensors.get(f"{name}.scale")
        if (
            not isinstance(error, (int, float))
            or isinstance(error, bool)
            or not math.isfinite(error)
            or tuple(motifs.shape) != (k, s)
            or tuple(mosaic.shape) != (out_features, num_blocks_per_row(in_features, s))
            or mosaic.dtype != index_dtype(k)
            or (mosaic.numel() and int(mosaic.max()) >= k)
            or (scales is None) == scale
            or (scales is not None and tuple(scales.shape) != (out_features,))
            or not torch.isfinite(motifs).all()
            or (scales is not None and not torch.isfinite(scales).all())
        ):
            raise ValueError(f"{name}'s tensors do not fit a {out_features}x{in_features} layer with k={k}, s={s}")
        return (nn.Parameter(motifs), mosaic, None if scales is None else nn.Parameter(scales), float(error))

    def save(self, index: int, fitted: Fitted) -> None:
        """Write block `index`'s fits under the current key (to a temporary name, then renamed into place)."""
        tensors = {}
        for name, (motifs, mosaic, scale, _) in fitted.items():
            tensors[f"{name}.motifs"] = motifs.detach().cpu().contiguous()
            tensors[f"{name}.mosaic"] = mosaic.cpu().contiguous()
            if scale is not None:
                tensors[f"{name}.scale"] = scale.detach().cpu().contiguous()
        errors = json.dumps({name: fit[3] for name, fit in fitted.items()})
        meta = {"key": self.block_key(index), "digest": _content_digest(tensors, errors), "errors": errors}
        partial = self.path(index).with_name(f".{self.path(index).name}.{os.getpid()}.partial")
        try:
            save_file(tensors, partial, metadata=meta)
            os.replace(partial, self.path(index))
        except BaseException:
            partial.unlink(missing_ok=True)  # this run's own temporary file
            raise


def _content_digest(tensors: Mapping[str, torch.Tensor], errors: str) -> str:
    return tensor_digest([tensors[name] for name in sorted(tensors)], json.dumps([sorted(tensors), errors]))
