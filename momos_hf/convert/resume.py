"""Resumable sequential conversion: each block's fit is saved as it finishes and reused by a rerun.

A block's file (`block-<i>.safetensors` in the resume folder) holds the motifs, mosaic, scale and fit error of
each of its layers, under a key made of everything the fit depended on (`conversion_key`: the MoMos settings,
the model's config and every parameter and buffer, the calibration batches) and the block's index. A file is
reused only when its key matches, its contents match the digest stored with them, and every tensor has the
shape, dtype and range the layer needs; otherwise the block is fitted again and its file replaced.

The folder's manifest (`momos-resume.json`) lists the block files this library wrote, by sha256: a
folder holding a file of a block's name that the manifest does not list with its sha256 (the user's own, or
one changed since) is refused, never overwritten. Files are written under a temporary name and renamed, so a
killed run leaves the old file or the new one, never half of one; its temporary
`.block-<i>.safetensors.<host>-<pid>.partial` is removed by the next run on that host once that process is gone.
Nothing else in the folder is read, moved or deleted.

Hashing the whole model up front costs about a second per 100M float32 parameters (sha256 at ~0.5 GB/s on one
core), small beside the fits of such a model's blocks (minutes), so the key is one for the whole conversion.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..checkpoint.save import folder_lock
from ..fit.methods import FitResult
from ..kernels.cpu import process_alive
from ..mosaic import index_dtype, num_blocks_per_row

logger = logging.get_logger(__name__)

Fitted = dict[str, FitResult]
MANIFEST = "momos-resume.json"
MANIFEST_FORMAT = "momos-hf resume folder 1"
BLOCK_FILE = re.compile(r"block-\d+\.safetensors")


def tensor_digest(tensors: Iterable[torch.Tensor], seed: str = "") -> str:
    """sha256 of `seed` and each tensor's dtype, shape and bytes, in order."""
    digest = hashlib.sha256(seed.encode())
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
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
    """The fits of converted blocks in `folder` (created if needed) for the conversion with key `key`. Refuses a
    folder holding block files it did not write; removes the temporary files of this host's runs that are gone."""

    def __init__(self, folder: str | os.PathLike, key: str) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"resume folder {folder} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        self._read_manifest()  # refuses a file of its name that is not a manifest
        foreign = sorted(p.name for p in self.folder.iterdir() if BLOCK_FILE.fullmatch(p.name) and not self._wrote(p))
        if foreign:
            raise ValueError(
                f"resume folder {folder} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                f"which momos-hf did not write (not in its {MANIFEST} or changed since): move them away or use "
                "another folder"
            )
        self._remove_stale_partials()

    def _wrote(self, path: Path) -> bool:
        """Whether `path` is a file the manifest lists with its current sha256."""
        return path.is_file() and _file_digest(path) in self._read_manifest().get(path.name, [])

    def _read_manifest(self) -> dict[str, list[str]]:
        """The block files written here and the sha256 of each version that may hold their name (none where
        there is no manifest yet)."""
        path = self.folder / MANIFEST
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text())
            blocks = manifest["blocks"]
            if manifest["format"] != MANIFEST_FORMAT or not all(
                BLOCK_FILE.fullmatch(name) and isinstance(digests, list) and all(isinstance(d, str) for d in digests)
                for name, digests in blocks.items()
            ):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(
                f"resume folder {self.folder} holds a {MANIFEST} that is not a momos-hf resume manifest: "
                "move it away or use another folder"
            ) from None
        return blocks

    def _remove_stale_partials(self) -> None:
        names = rf"(block-\d+\.safetensors|{re.escape(MANIFEST)})"
        mine = re.compile(rf"\.{names}\.{re.escape(socket.gethostname())}-(\d+)\.partial")
        for path in self.folder.iterdir():
            match = mine.fullmatch(path.name)
            if match and path.is_file() and not process_alive(int(match[2])):
                path.unlink(missing_ok=True)

    def block_key(self, index: int) -> str:
        return tensor_digest([], f"{self.key} block {index}")

    def path(self, index: int) -> Path:
        return self.folder / f"block-{index}.safetensors"

    def load(
        self, index: int, expected: Mapping[str, tuple[int, int, int, int, bool, torch.dtype]]
    ) -> Optional[Fitted]:
        """Block `index`'s fits if its file is there, has the current key and holds, for each `name -> (out,
        in, k, s, scale, dtype)` of `expected` (dtype: the motifs' and scales'), valid tensors; else None (with a
        warning when a file was rejected)."""
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
        dtype: torch.dtype,
    ) -> FitResult:
        motifs, mosaic, scales = tensors[f"{name}.motifs"], tensors[f"{name}.mosaic"], tensors.get(f"{name}.scale")
        if (
            not isinstance(error, (int, float))
            or isinstance(error, bool)
            or not math.isfinite(error)
            or tuple(motifs.shape) != (k, s)
            or motifs.dtype != dtype
            or (scales is not None and scales.dtype != dtype)
            or tuple(mosaic.shape) != (out_features, num_blocks_per_row(in_features, s))
            or mosaic.dtype != index_dtype(k)
            or (mosaic.numel() and int(mosaic.max()) >= k)
            or (scales is None) == scale
            or (scales is not None and tuple(scales.shape) != (out_features,))
            or not torch.isfinite(motifs).all()
            or (scales is not None and not torch.isfinite(scales).all())
        ):
            raise ValueError(
                f"{name}'s tensors do not fit a {out_features}x{in_features} layer with k={k}, s={s}, {dtype} motifs"
            )
        return FitResult(nn.Parameter(motifs), mosaic, None if scales is None else nn.Parameter(scales), float(error))

    def save(self, index: int, fitted: Fitted) -> None:
        """Write block `index`'s fits under the current key (to a temporary name, then renamed into place)."""
        tensors = {}
        for name, fit in fitted.items():
            tensors[f"{name}.motifs"] = fit.motifs.detach().cpu().contiguous()
            tensors[f"{name}.mosaic"] = fit.mosaic.cpu().contiguous()
            if fit.scale is not None:
                tensors[f"{name}.scale"] = fit.scale.detach().cpu().contiguous()
        errors = json.dumps({name: fit.error for name, fit in fitted.items()})
        meta = {"key": self.block_key(index), "digest": _content_digest(tensors, errors), "errors": errors}
        path = self.path(index)
        partial = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.partial")
        try:
            save_file(tensors, partial, metadata=meta)
            with folder_lock(self.folder):
                ours = self._wrote(path)
                if path.exists() and not ours:  # appeared during the conversion: the user's
                    raise ValueError(f"{path} appeared during the conversion and momos-hf did not write it")
                # listed before it takes the name: a run killed in between leaves the old file and the new ours
                self._record(path.name, ([_file_digest(path)] if ours else []) + [_file_digest(partial)])
                os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)  # this run's own temporary file
            raise

    def _record(self, name: str, digests: list[str]) -> None:
        """List the versions `digests` of block file `name` in the manifest (re-read under the folder's lock:
        another run may have added its own blocks)."""
        blocks = {**self._read_manifest(), name: digests}
        manifest = self.folder / MANIFEST
        partial = manifest.with_name(f".{MANIFEST}.{socket.gethostname()}-{os.getpid()}.partial")
        partial.write_text(json.dumps({"format": MANIFEST_FORMAT, "blocks": blocks}, indent=1, sort_keys=True))
        os.replace(partial, manifest)


def _content_digest(tensors: Mapping[str, torch.Tensor], errors: str) -> str:
    return tensor_digest([tensors[name] for name in sorted(tensors)], json.dumps([sorted(tensors), errors]))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
