"""Saving a compact checkpoint: a save that never loses anything (journal, lock, fsync, one rename commits it)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..config import MoMosConfig
from ..layer import LayerSpec
from .schema import (
    FORMAT_VERSION,
    INDEX_SUFFIX,
    JOURNAL_NAME,
    LOAD_MARKER,
    QUANT_METHOD,
    STAGING_NAME,
    STAGING_PREFIX,
    WEIGHT_FILE_NAME,
    WEIGHTS_PREFIX,
    config_digest,
    layer_specs,
    plain_file_name,
    sha256_of,
    storage_dtype,
    unique_state_dict,
)

try:  # the folder lock; where fcntl is missing (Windows) saves are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.get_logger(__name__)


class SaveError(OSError, ValueError):
    """A write of a save that the system refused (disk full, file too large, read-only file system, ...), in one
    line naming the file and the cause; `errno` is the system's. The folder keeps its previous checkpoint."""


@contextlib.contextmanager
def _writing(what: Union[str, Path]) -> Iterator[None]:
    """Turn a failed write of `what` (a file, or a description) into a `SaveError` naming it."""
    try:
        yield
    except SaveError:
        raise
    except (OSError, SafetensorError) as err:
        code = err.errno if isinstance(err, OSError) else _os_error_code(str(err))
        cause = os.strerror(code) if code else " ".join(str(err).split())
        error = SaveError(f"cannot write {what}: {cause}")
        error.errno = code
        raise error from err


def _os_error_code(message: str) -> Optional[int]:
    # safetensors reports an I/O error as text: "... I/O error: File too large (os error 27)"
    found = re.search(r"os error (\d+)", message)
    return int(found.group(1)) if found else None


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
        raise ValueError(
            f"tokenizer must be a tokenizer or processor (with save_pretrained), got {type(tokenizer).__name__}"
        )
    state = unique_state_dict(model, state_dict)
    for name, tensor in state.items():
        if (
            name.rpartition(".")[0] in specs
            and name.endswith((".motifs", ".scale"))
            and not torch.isfinite(tensor).all()
        ):
            raise ValueError(f"{name} has NaN or infinite values: the checkpoint would not load, so it is not saved")
    store_q_bit_dictionaries(state, specs, MoMosConfig.from_dict(momos_config))
    quantization = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "momos_config": momos_config,
        "layers": {n: s.to_dict() for n, s in specs.items()},
    }
    config = json.loads(model.config.to_json_string())
    config.pop("quantization_config", None)
    config.update(
        architectures=[type(model).__name__], dtype=storage_dtype(state, specs), transformers_weights=LOAD_MARKER
    )
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
    """Replace each q-bit dictionary's `motifs` in `state` by what its format stores, `motif_codes` and
    `motif_step` (as forward uses it: motif 0 zero under `zero_motif`)."""
    for name, spec in specs.items():
        if spec.motifs == name and spec.dictionary.q_bits is not None:
            motifs = state.pop(f"{name}.motifs").float().clone()  # not the model's own motifs, zeroed below
            if config.zero_motif:
                motifs[0] = 0.0
            state.update({f"{name}.{part}": tensor for part, tensor in spec.dictionary.encode(motifs).items()})


def plan_weight_files(
    state: dict[str, torch.Tensor], target: Path, max_shard_size: Union[int, str]
) -> tuple[Any, str]:
    """How the weights are split and named: Transformers' usual names (`model.safetensors`, or shards and
    `model.safetensors.index.json`) where none of them exists in `target`, else fresh ones
    (`model-momos-<id>...`) that cannot clash with the files the current config.json names. Returns the
    split and the name of the weight file or index."""
    for prefix in ("model", f"{WEIGHTS_PREFIX}{secrets.token_hex(6)}"):
        split = split_torch_state_dict_into_shards(
            state, filename_pattern=f"{prefix}{{suffix}}.safetensors", max_shard_size=max_shard_size
        )
        weights = f"{prefix}{INDEX_SUFFIX}" if split.is_sharded else next(iter(split.filename_to_tensors))
        if not any(os.path.lexists(target / name) for name in [weights, *split.filename_to_tensors]):
            break
    return split, weights


def _write_and_commit(
    model: nn.Module,
    target: Path,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    quantization: dict[str, Any],
    tokenizer: Any,
    max_shard_size: Union[int, str],
) -> None:
    """The body of `save_checkpoint`, under the folder lock: journal, files in a staging folder, renames,
    and last the rename of config.json that commits the save."""
    previous = owned_weight_files(target)
    split, weights = plan_weight_files(state, target, max_shard_size)
    quantization = {**quantization, "weights": weights}
    metadata = {"format": "pt", "momos_config_sha256": config_digest({**config, "quantization_config": quantization})}
    staging = target / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    with _writing(staging):
        staging.mkdir()
    created = list(split.filename_to_tensors) + ([weights] if split.is_sharded else [])
    with _writing(target / JOURNAL_NAME):
        write_json_atomic(
            target / JOURNAL_NAME,
            {"staging": staging.name, "create": created, "remove": sorted(previous - set(created))},
            staging,
        )
    checksums = {}
    for filename, names in split.filename_to_tensors.items():
        with _writing(target / filename):
            save_file({n: state[n] for n in names}, staging / filename, metadata=metadata)
            checksums[filename] = sha256_of(staging / filename, sync=True)
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": split.tensor_to_filename,
        }
        with _writing(target / weights):
            write_text_synced(staging / weights, json.dumps(index, indent=2, sort_keys=True) + "\n")
        checksums[weights] = sha256_of(staging / weights)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        with _writing(target / "generation_config.json"):
            generation_config.save_pretrained(staging)
    if tokenizer is not None:
        with _writing(f"the tokenizer files into {target}"):
            tokenizer.save_pretrained(staging)
    config["quantization_config"] = {**quantization, "checksums": checksums}
    with _writing(target / "config.json"):
        write_text_synced(staging / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    with _writing(target):
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


_LOADING: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("momos_loading", default=frozenset())


@contextlib.contextmanager
def load_lock(directory: Union[str, os.PathLike]) -> Iterator[None]:
    """Hold a shared lock on a local model folder for a whole load, so that a save into it (which holds the
    exclusive `folder_lock`) is waited for and every file the load reads belongs to one save. A save that was
    killed is first completed (or undone), so that the generation config and tokenizer match the weights.
    Reentrant; a no-op for anything but a readable local folder."""
    key = os.path.realpath(directory)
    if fcntl is None or key in _LOADING.get() or not os.path.isdir(key):
        yield
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened cannot be loaded either: the load says why
        yield
        return
    token = _LOADING.set(_LOADING.get() | {key})
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # Converting a flock lock drops it first; nothing is read yet, so another save may run meanwhile.
        while (Path(key) / JOURNAL_NAME).exists():
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                recover_interrupted_save(Path(key))
            except OSError as err:
                _warn_unfinished(Path(key), err)
                break
            finally:
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        _LOADING.reset(token)
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
            raise ValueError(
                f"{journal_path} (the record of an interrupted save) is unreadable ({err}); "
                "remove it by hand after checking the folder"
            ) from None
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
    if not (directory / JOURNAL_NAME).exists() or os.path.realpath(directory) in _LOADING.get():
        return  # under `load_lock` the journal was dealt with before anything was read
    try:
        with folder_lock(directory):
            recover_interrupted_save(directory)
    except OSError as err:
        _warn_unfinished(directory, err)


def _warn_unfinished(directory: Path, err: OSError) -> None:
    logger.warning(
        f"{directory} holds an interrupted save that could not be completed ({err.strerror or err}); "
        "its weights are whole, but its tokenizer and generation config may be the previous save's"
    )


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
        raise ValueError(
            f"{directory} already holds a model that is not a MoMos checkpoint (its config.json); "
            "save into a new or empty folder"
        )
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
