"""Compact MoMos checkpoints on disk: the format, a save that never loses anything, and the checks a load
makes before any weight is used.

Format (version 2). A checkpoint folder holds:
- `config.json`: the model's config, its `dtype` (storage dtype of the untouched weights), and a
  `quantization_config` with `quant_method: "momos"`, `format_version`, `momos_config`, one `LayerSpec` per
  MoMos layer, `weights` (the weight file, or the index of the shards) and `checksums` (sha256 of every
  weight file and of the index). Its top-level `transformers_weights` holds `LOAD_MARKER`: Transformers reads
  that key as the name of the weight file, so without `import momos_hf` a plain `from_pretrained` stops with
  an error saying what to install instead of loading random weights; the MoMos quantizer points it at
  `weights`.
- `model.safetensors` (or shards `model-0000i-of-0000n.safetensors` and their index
  `model.safetensors.index.json`; saved over an earlier checkpoint, `model-momos-<id>...`): each layer's `motifs` (once per dictionary), `mosaic_packed`
  and `scale`, and every other weight. With q-bit motifs (`motif_bits`) a dictionary is stored as
  `motif_codes` (its values' grid codes, packed at q bits each) and `motif_step` (the grid's float32 step). Every file's metadata carries the sha256 of the quantization config,
  so an edited config.json is caught as surely as an edited weight file.
Safetensors only: nothing is ever unpickled.

Saving. `config.json` is the commit point. New weight files take Transformers' usual names where the folder
has none of them (a new folder, as for Trainer's checkpoints), else fresh ones, so they never overwrite
those the current config.json refers to; the new config.json replaces the old one in one rename; only then are the
previous save's weight files (the ones its config.json lists) removed. A journal written before any file
records what the save creates and what it will remove, so the next save into the folder, or the next load
from it, rolls back or completes a save that was killed. A lock on the folder makes concurrent saves take turns. Files the save did
not write are never moved or deleted, and a folder holding another kind of model is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from .config import MoMosConfig
from .fitting import grid_values, index_bits, motif_grid, num_blocks_per_row, reconstruct
from .layer import LayerSpec, momos_layers
from .packing import pack_indices, packed_size, unpack_indices

try:  # the folder lock; where fcntl is missing (Windows) saves are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

QUANT_METHOD = "momos"
FORMAT_VERSION = 2
LOAD_MARKER = ("this is a MoMos checkpoint: run `pip install momos-hf`, then `import momos_hf` before "
               "from_pretrained (transformers_weights is not a file name here)")
WEIGHTS_PREFIX = "model-momos-"
INDEX_SUFFIX = ".safetensors.index.json"
JOURNAL_NAME = ".momos-save.json"
STAGING_PREFIX = ".momos-save-"
STAGING_NAME = re.compile(r"\.momos-save-[0-9a-f]{12}")
# The only names a save ever removes: weight files and indexes in the two naming schemes above.
WEIGHT_FILE_NAME = re.compile(r"model(-momos-[0-9a-f]{12})?(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
logger = logging.get_logger(__name__)
QUANTIZATION_FIELDS = {"quant_method", "format_version", "base_model", "momos_config", "layers", "weights", "checksums"}
FLOAT_DTYPES = {"F32": 32, "F16": 16, "BF16": 16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_BITS = {**FLOAT_DTYPES, "F64": 64, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "I32": 32, "I64": 64, "BOOL": 8}


# -- what the checkpoint says ---------------------------------------------------------------------------

def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    """The spec of every MoMos layer of `model`: a shared dictionary is stored by its first layer, a tied
    layer's mosaic and scale by the layer it is tied to."""
    layers = momos_layers(model)
    names = {id(layer): name for name, layer in layers.items()}
    owners: dict[int, str] = {}
    return {name: layer.spec(owners.setdefault(id(layer.motifs), name), names[id(layer.leader or layer)])
            for name, layer in layers.items()}


def parse_quantization(quantization: Any) -> dict[str, LayerSpec]:
    """Validate a `quantization_config` dict against the format before anything is built from it; returns
    its layer specs. Every error names the field."""
    if not isinstance(quantization, dict):
        raise ValueError(f"quantization_config must be an object, got {type(quantization).__name__}")
    unknown = set(quantization) - QUANTIZATION_FIELDS
    if unknown:
        raise ValueError(f"quantization_config has unknown fields {sorted(unknown)}")
    if quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method is {quantization.get('quant_method')!r}, not {QUANT_METHOD!r}")
    version = quantization.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"quantization_config.format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"this checkpoint uses momos format_version {version}; this momos-hf reads {FORMAT_VERSION}: upgrade momos-hf")
    if version < FORMAT_VERSION:
        raise ValueError(f"this checkpoint uses momos format_version {version}, which carries no integrity record; "
                         f"this momos-hf reads {FORMAT_VERSION}: load it with momos-hf 0.1 and save it again")
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
        if spec.s != config.s or (config.k is not None and spec.k != config.k) or spec.scale != config.scale:
            raise ValueError(f"layer {name!r} (k={spec.k}, s={spec.s}, scale={spec.scale}) contradicts momos_config "
                             f"(k={config.k}, s={config.s}, scale={config.scale})")
        owner = specs.get(spec.motifs)
        if owner is None or owner.motifs != spec.motifs:
            raise ValueError(f"layer {name!r} uses the motifs of {spec.motifs!r}, which does not store a dictionary")
        if (owner.k, owner.s) != (spec.k, spec.s):
            raise ValueError(f"layer {name!r} has k={spec.k}, s={spec.s} but its dictionary {spec.motifs!r} has k={owner.k}, s={owner.s}")
        leader = specs.get(spec.mosaic)
        if leader is None or leader.mosaic != spec.mosaic:
            raise ValueError(f"layer {name!r} is tied to {spec.mosaic!r}, which does not store a mosaic")
        same = ("in_features", "out_features", "k", "s", "scale", "motifs")
        if spec.mosaic != name and any(getattr(spec, f) != getattr(leader, f) for f in same):
            raise ValueError(f"layer {name!r} is tied to {spec.mosaic!r} but differs from it in shape, k, s, scale or dictionary")
    weights = quantization.get("weights")
    if weights is not None and not (plain_file_name(weights) and weights.endswith((".safetensors", INDEX_SUFFIX))):
        raise ValueError(f"quantization_config.weights must be a .safetensors or {INDEX_SUFFIX} file name, got {weights!r}")
    checksums = quantization.get("checksums")
    if checksums is not None and not (isinstance(checksums, dict) and all(
            plain_file_name(n) and isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for n, h in checksums.items())):
        raise ValueError("quantization_config.checksums must map file names to sha256 hex digests")
    return specs


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of a checkpoint's config.json as saved, without the two entries that cannot be in it: the
    checksums (they hash the files that carry this digest) and the load marker."""
    quantization = {key: value for key, value in config["quantization_config"].items() if key != "checksums"}
    covered = {**{key: value for key, value in config.items() if key != "transformers_weights"},
               "quantization_config": quantization}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_signed(header: dict[str, Any], digest: str, name: str) -> None:
    """The weight file `name` (whose safetensors header is `header`) was saved with the config.json whose
    `config_digest` is `digest`."""
    if header.get("__metadata__", {}).get("momos_config_sha256") != digest:
        raise ValueError(f"config.json is not the one {name} was saved with (edited, or from another save)")


def plain_file_name(name: Any) -> bool:
    """A name of a file directly inside the folder: no separators, no `..`, not hidden."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


def unique_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` holds: every persistent parameter and buffer of its state dict, each
    shared parameter once under its first name (a shared dictionary under its owner layer, tied embeddings
    under the input embeddings; loading re-ties them), no latent weights, no tied layer's copy of its
    leader's mosaic. `state_dict` gives the values instead (a gathered one, for sharded models): it must
    hold every one of those names, in the model's shapes, or nothing is saved."""
    layers = momos_layers(model)
    skipped = {f"{n}.latent" for n in layers} | {f"{n}.mosaic_packed" for n, m in layers.items() if m.leader is not None}
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
        raise ValueError(f"the state_dict to save lacks {missing[:5]}" if missing else
                         f"the state_dict to save has other shapes than the model for {wrong[:5]}")
    return {name: state_dict[name].detach().contiguous() for name in own}


def storage_dtype(state: dict[str, torch.Tensor], specs: dict[str, LayerSpec]) -> str:
    """The dtype the untouched float weights are stored in (what `dtype="auto"` loads them as)."""
    momos = {f"{name}.{part}" for name in specs for part in ("motifs", "scale", "motif_step")}  # their dtype may differ
    for name, tensor in state.items():
        if tensor.is_floating_point() and name not in momos:
            return str(tensor.dtype).removeprefix("torch.")
    return str(next(t for t in state.values() if t.is_floating_point()).dtype).removeprefix("torch.")


# -- saving ---------------------------------------------------------------------------------------------

def save_checkpoint(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    momos_config: dict[str, Any],
    tokenizer: Any = None,
    max_shard_size: Union[int, str] = "5GB",
    base_model: str = "",
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write `model` (a Transformers model holding MoMos layers) as a compact checkpoint into `directory`
    (see the module docstring for what is written and how a failed save leaves the folder)."""
    specs = layer_specs(model)
    if not specs:
        raise ValueError(f"{type(model).__name__} has no MoMos layers to save (convert it with get_momos_model)")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(f"tokenizer must be a tokenizer or processor (with save_pretrained), got {type(tokenizer).__name__}")
    state = unique_state_dict(model, state_dict)
    for name, tensor in state.items():
        if name.rpartition(".")[0] in specs and name.endswith((".motifs", ".scale")) and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} has NaN or infinite values: the checkpoint would not load, so it is not saved")
    store_q_bit_dictionaries(state, specs, MoMosConfig.from_dict(momos_config))
    quantization = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "base_model": base_model,
                    "momos_config": momos_config, "layers": {n: s.to_dict() for n, s in specs.items()}}
    config = json.loads(model.config.to_json_string())
    config.pop("quantization_config", None)
    config.update(architectures=[type(model).__name__], dtype=storage_dtype(state, specs), transformers_weights=LOAD_MARKER)
    target = Path(directory)
    if target.is_symlink() and not target.exists():
        raise ValueError(f"cannot save into {target}: it is a link to a folder that does not exist")
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save into {target}: it is a file, not a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder {target}: {err.strerror or err}") from None
    with folder_lock(target):
        recover_interrupted_save(target)
        try:
            _write_and_commit(model, target, state, config, quantization, tokenizer, max_shard_size)
        finally:  # after the commit this drops the previous weights; before it (an error) the new files
            recover_interrupted_save(target)
    return target


def store_q_bit_dictionaries(state: dict[str, torch.Tensor], specs: dict[str, LayerSpec], config: MoMosConfig) -> None:
    """Replace each dictionary's `motifs` in `state` by its q-bit form, `motif_codes` and `motif_step` (as
    forward uses it: motif 0 zero under `zero_motif`), when the config has `motif_bits`."""
    if config.motif_bits is None:
        return
    for name, spec in specs.items():
        if spec.motifs == name:
            motifs = state.pop(f"{name}.motifs").float()
            if config.zero_motif:
                motifs[0] = 0.0
            codes, step = motif_grid(motifs, config.motif_bits)
            state[f"{name}.motif_codes"] = pack_indices(codes, config.motif_bits)
            state[f"{name}.motif_step"] = step.reshape(1)


def q_bit_dictionary(codes: torch.Tensor, step: torch.Tensor, bits: int, k: int, s: int) -> torch.Tensor:
    """The float32 `motifs[k, s]` of a stored q-bit dictionary; codes beyond the grid or a step that is not a
    finite number >= 0 are refused."""
    values = unpack_indices(codes, bits, k * s)
    if len(values) and values.max() > 2**bits - 2:
        raise ValueError(f"motif codes reach {int(values.max())}, beyond the {2**bits - 1} levels of a {bits}-bit grid")
    if step.numel() != 1 or not torch.isfinite(step).all() or step.item() < 0:
        raise ValueError(f"the motif grid step is {step.tolist()}, not a finite number >= 0")
    return grid_values(values, step, bits).reshape(k, s)


def plan_weight_files(state: dict[str, torch.Tensor], target: Path, max_shard_size: Union[int, str]) -> tuple[Any, str]:
    """How the weights are split and named: Transformers' usual names (`model.safetensors`, or shards and
    `model.safetensors.index.json`) where none of them exists in `target`, else fresh ones
    (`model-momos-<id>...`) that cannot clash with the files the current config.json names. Returns the
    split and the name of the weight file or index."""
    for prefix in ("model", f"{WEIGHTS_PREFIX}{secrets.token_hex(6)}"):
        split = split_torch_state_dict_into_shards(state, filename_pattern=f"{prefix}{{suffix}}.safetensors",
                                                   max_shard_size=max_shard_size)
        weights = f"{prefix}{INDEX_SUFFIX}" if split.is_sharded else next(iter(split.filename_to_tensors))
        if not any(os.path.lexists(target / name) for name in [weights, *split.filename_to_tensors]):
            break
    return split, weights


def _write_and_commit(model: nn.Module, target: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                      quantization: dict[str, Any], tokenizer: Any, max_shard_size: Union[int, str]) -> None:
    """The body of `save_checkpoint`, under the folder lock: journal, files in a staging folder, renames,
    and last the rename of config.json that commits the save."""
    previous = owned_weight_files(target)
    split, weights = plan_weight_files(state, target, max_shard_size)
    quantization = {**quantization, "weights": weights}
    metadata = {"format": "pt", "momos_config_sha256": config_digest({**config, "quantization_config": quantization})}
    staging = target / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    staging.mkdir()
    created = list(split.filename_to_tensors) + ([weights] if split.is_sharded else [])
    write_json_atomic(target / JOURNAL_NAME, {"staging": staging.name, "create": created,
                                               "remove": sorted(previous - set(created))}, staging)
    checksums = {}
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, staging / filename, metadata=metadata)
        checksums[filename] = sha256_of(staging / filename, sync=True)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        write_text_synced(staging / weights, json.dumps(index, indent=2, sort_keys=True) + "\n")
        checksums[weights] = sha256_of(staging / weights)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    config["quantization_config"] = {**quantization, "checksums": checksums}
    write_text_synced(staging / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in created:  # fresh names: nothing the current config.json refers to is touched
        os.replace(staging / name, target / name)
    os.replace(staging / "config.json", target / "config.json")  # the commit
    sync_directory(target)
    # The generation config and tokenizer follow the commit; if the process dies first, the next save moves
    # them from the staging folder (`recover_interrupted_save`), so they never sit beside the old weights.


@contextlib.contextmanager
def folder_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` itself (no lock file is left behind)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def recover_interrupted_save(directory: Path) -> None:
    """Finish or undo the save recorded in the folder's journal, if any. After its commit (config.json names
    its weights): move the files still waiting in its staging folder (generation config, tokenizer) into
    place and remove the previous weights. Before it: remove the new weights. Only weight-file names of
    this format that the journal lists, and staging folders of this format, are ever removed. Call with the
    folder lock held."""
    journal_path = directory / JOURNAL_NAME
    if journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            staging, create, remove = str(journal["staging"]), list(journal["create"]), list(journal["remove"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{journal_path} (the record of an interrupted save) is unreadable ({err}); "
                             "remove it by hand after checking the folder") from None
        committed = current_weights(directory) in create
        waiting = directory / staging
        if committed and STAGING_NAME.fullmatch(staging) and waiting.is_dir() and not waiting.is_symlink():
            for entry in sorted(waiting.iterdir()):
                if entry.is_file() and not entry.is_symlink() and plain_file_name(entry.name):
                    os.replace(entry, directory / entry.name)
        for name in remove if committed else create:
            path = directory / str(name)
            if WEIGHT_FILE_NAME.fullmatch(str(name)) and path.is_file() and not path.is_symlink():
                path.unlink()
    for entry in directory.iterdir():
        if STAGING_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
    if journal_path.exists():
        journal_path.unlink()
        sync_directory(directory)


def finish_interrupted_save(directory: Path) -> None:
    """Before a load: complete (or undo) a save into `directory` that was killed, so that the generation config
    and tokenizer read next belong to the weights, waiting for a save in progress. A folder the loader may not
    write is left as it is, with a warning."""
    if not (directory / JOURNAL_NAME).exists():
        return
    try:
        with folder_lock(directory):
            recover_interrupted_save(directory)
    except OSError as err:
        logger.warning(f"{directory} holds an interrupted save that could not be completed ({err.strerror or err}); "
                       "its weights are whole, but its tokenizer and generation config may be the previous save's")


def current_weights(directory: Path) -> Optional[str]:
    """The weight file (or index) that the folder's MoMos config.json names, `None` without one."""
    try:
        quantization = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return quantization.get("weights") if isinstance(quantization, dict) else None


def owned_weight_files(directory: Path) -> set[str]:
    """The weight files that the folder's previous MoMos save wrote (its checksums list them); refuses a
    folder whose config.json belongs to a model momos-hf did not write."""
    path = directory / "config.json"
    if not os.path.lexists(path):
        return set()
    try:
        quantization = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):  # not a file, not JSON, not an object: not ours
        quantization = {}
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{directory} already holds a model that is not a MoMos checkpoint (its config.json); "
                         "save into a new or empty folder")
    checksums = quantization.get("checksums") or {}
    return {name for name in checksums if WEIGHT_FILE_NAME.fullmatch(name)} if isinstance(checksums, dict) else set()


def write_json_atomic(path: Path, value: Any, staging: Path) -> None:
    """Write `value` as JSON to `path` in one rename (through `staging`, on the same file system)."""
    temporary = staging / path.name
    write_text_synced(temporary, json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)
    sync_directory(path.parent)


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def sync_directory(directory: Path) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Union[str, os.PathLike], sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


# -- loading checks -------------------------------------------------------------------------------------

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
            raise ValueError(f"{path.name} is corrupted or truncated: its header claims {header_len} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path.name} is corrupted: its safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict) or not all(
            isinstance(v, str) for v in header.get("__metadata__", {}).values()):
        raise ValueError(f"{path.name} is corrupted: its safetensors header is not an object of tensors and metadata")
    end = 0
    for name, meta in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda item: _offsets(item[1])[0] if _offsets(item[1]) else -1):
        offsets = _offsets(meta)
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if (offsets is None or meta.get("dtype") not in DTYPE_BITS or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                or offsets[0] != end or offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BITS[meta["dtype"]] // 8):
            raise ValueError(f"{path.name} is corrupted: the header entry of {name} does not describe its bytes")
        end = offsets[1]
    if 8 + header_len + end != size:
        raise ValueError(f"{path.name} is truncated or corrupted: its header describes {8 + header_len + end} bytes, the file has {size}")
    return header


def _offsets(meta: Any) -> Optional[tuple[int, int]]:
    offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
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
    quantization = config.get("quantization_config")
    specs = parse_quantization(quantization)
    checksums, weights = quantization.get("checksums"), quantization.get("weights")
    if not checksums or not weights:
        raise ValueError("config.json records no checksums for its weight files: the MoMos checkpoint cannot be "
                         "verified, so it is not loaded")
    files = weight_file_names(directory, weights)
    uncovered = sorted({weights, *files} - set(checksums))
    if uncovered:
        raise ValueError(f"config.json records no checksum for {uncovered}: the MoMos checkpoint cannot be verified")
    if weights.endswith(INDEX_SUFFIX) and sha256_of(checked_file(directory, weights)) != checksums[weights]:
        raise ValueError(f"{weights} is corrupted: its sha256 differs from the one recorded in config.json at save time")
    digest = config_digest(config)
    tensors: dict[str, dict] = {}
    for name in files:
        path = checked_file(directory, name)
        header = safetensors_header(path)
        if sha256_of(path) != checksums[name]:
            raise ValueError(f"{name} is corrupted: its sha256 differs from the one recorded in config.json at save time")
        check_signed(header, digest, name)
        tensors.update((key, value) for key, value in header.items() if key != "__metadata__")
    check_momos_tensors(tensors, specs, quantization["momos_config"].get("motif_bits"))
    return tensors


def check_momos_tensors(tensors: dict[str, dict], specs: dict[str, LayerSpec], motif_bits: Optional[int] = None) -> None:
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
            raise ValueError(f"MoMos tensor {key} is {tensors[key].get('dtype')} {tensors[key].get('shape')}; "
                             f"the layer spec calls for {'/'.join(sorted(dtypes))} {shape}")
    extra = sorted(key for key in tensors if key not in expected and (
        key.endswith((".motifs", ".mosaic_packed", ".motif_codes", ".motif_step")) or key.removesuffix(".scale") in specs))
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
        raise ValueError(f"{directory} is not a MoMos checkpoint: config.json has no quantization_config with quant_method 'momos'")
    parse_quantization(quantization)
    return config


# -- sizes ----------------------------------------------------------------------------------------------

def checkpoint_info(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """Sizes of a local MoMos checkpoint, read from `config.json` and the safetensors headers alone.

    Returns the MoMos settings, parameter counts, the bytes the MoMos layers take on disk next to their
    description length (`k*s*b_motif + n_blocks*ceil(log2 k)` per dictionary, plus scales), and the whole
    checkpoint's bytes next to the same model stored dense in fp16 and fp32.
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    quantization = config["quantization_config"]
    specs = parse_quantization(quantization)
    if not quantization.get("weights"):
        raise ValueError(f"{directory}: config.json names no weight file")
    files = [checked_file(directory, name) for name in weight_file_names(directory, quantization["weights"])]
    tensors, digest = {}, config_digest(config)
    for path in files:
        header = safetensors_header(path)
        check_signed(header, digest, path.name)
        tensors.update((k, v) for k, v in header.items() if k != "__metadata__")
    motif_bits = quantization["momos_config"].get("motif_bits")
    check_momos_tensors(tensors, specs, motif_bits)

    def nbytes(meta: dict) -> int:
        return meta["data_offsets"][1] - meta["data_offsets"][0]

    parts = ("motifs", "mosaic_packed", "scale", "motif_codes", "motif_step")
    momos_names = {f"{n}.{part}" for n in specs for part in parts} & set(tensors)
    description_bits = 0
    for name, spec in specs.items():
        value_bits = motif_bits or DTYPE_BITS[tensors[f"{spec.motifs}.motifs"]["dtype"]]
        scale_bits = DTYPE_BITS[tensors[f"{spec.mosaic}.scale"]["dtype"]] if spec.scale else 0
        description_bits += sum(spec.description_bits(name, value_bits, scale_bits, motif_bits))
    converted = sum(spec.out_features * spec.in_features for name, spec in specs.items() if spec.mosaic == name)
    other = {name: meta for name, meta in tensors.items() if name not in momos_names}
    return {
        "base_model": quantization.get("base_model", ""),
        "architecture": (config.get("architectures") or ["?"])[0],
        "momos_config": quantization["momos_config"],
        "dtype": config.get("dtype"),
        "layers": len(specs),
        "dictionaries": sum(spec.motifs == name for name, spec in specs.items()),
        "converted_params": converted,
        "other_params": sum(math.prod(meta["shape"]) for meta in other.values()),
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
    quantization = read_checkpoint_config(directory)["quantization_config"]
    specs = parse_quantization(quantization)
    motif_bits = quantization["momos_config"].get("motif_bits")
    location = {}
    for name in weight_file_names(directory, quantization["weights"]):
        location.update(dict.fromkeys(safetensors_header(checked_file(directory, name)), directory / name))

    def tensor(key: str) -> torch.Tensor:
        with safe_open(location[key], "pt") as f:
            return f.get_tensor(key)

    parts, count = [], 0
    for name, spec in specs.items():
        if count >= max_values:
            break
        if spec.mosaic != name:  # a tied layer's matrix is its leader's
            continue
        mosaic = unpack_indices(tensor(f"{name}.mosaic_packed"), index_bits(spec.k), spec.num_blocks)
        scale = tensor(f"{name}.scale").float() if spec.scale else None
        motifs = tensor(f"{spec.motifs}.motifs").float() if motif_bits is None else q_bit_dictionary(
            tensor(f"{spec.motifs}.motif_codes"), tensor(f"{spec.motifs}.motif_step"), motif_bits, spec.k, spec.s)
        matrix = reconstruct(motifs,
                             mosaic.reshape(spec.out_features, num_blocks_per_row(spec.in_features, spec.s)),
                             spec.in_features, scale)
        parts.append(matrix.flatten()[: max_values - count])
        count += parts[-1].numel()
    return torch.cat(parts)


def format_info(info: dict[str, Any]) -> str:
    """`checkpoint_info` as the console text of `momos-hf info`."""
    mib = 2**20
    settings = info["momos_config"]
    k = settings["k"] if settings.get("k") is not None else f"capacity {settings['capacity']}"
    return "\n".join([
        f"architecture         {info['architecture']} (base model: {info['base_model'] or 'not recorded'})",
        f"MoMos settings       k={k}, s={settings['s']}, scope={settings['motif_scope']}, fit={settings['fit']}, scale={settings['scale']}"
        + (f", motif_bits={settings['motif_bits']}" if settings.get("motif_bits") else ""),
        f"MoMos layers         {info['layers']} ({info['dictionaries']} dictionaries), {info['converted_params']:,d} weights; "
        f"{info['other_params']:,d} other parameters stored as {info['dtype']}",
        f"bits per weight      {info['bits_per_weight']:.4f} (mosaic, dictionaries and scales)",
        f"MoMos layers on disk {info['momos_bytes_on_disk'] / mib:.3f} MiB = {info['momos_bytes_on_disk'] / info['description_length_bytes']:.4f}x their description length",
        f"checkpoint           {info['checkpoint_bytes'] / mib:.3f} MiB vs dense fp16 {info['dense_fp16_bytes'] / mib:.3f} MiB "
        f"({info['dense_fp16_bytes'] / info['checkpoint_bytes']:.2f}x) and fp32 {info['dense_fp32_bytes'] / mib:.3f} MiB ({info['dense_fp32_bytes'] / info['checkpoint_bytes']:.2f}x)",
    ])
