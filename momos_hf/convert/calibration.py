"""Calibration: stream a model's inputs to its target layers into each layer's input moment
`H = X^T X / rows`, the metric of data-aware fitting (`momos_hf.fit.data_aware`).

Two ways. `input_moments` runs the whole model once and holds every target's moment. The sequential way (GPTQ's,
`block_by_block`) goes block by block through a stack of transformer blocks: `block_inputs` runs the calibration
batches up to the first block and keeps what it receives, `run_block` passes them through one block (recording the
moments of its layers with a `MomentRecorder`), and the block's outputs, once it is converted, are the next block's
inputs. Only one block's moments are held at a time, and the hidden states between two blocks live in an
`ActivationStore` (memory up to a budget, then disk).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils.logging import tqdm

from ..layer import MoMosLayer, layer_class_for
from .targets import output_embeddings


class MomentRecorder:
    """Forward pre-hooks that sum the rows each named module (a target, or a MoMos layer) multiplies
    (`MoMosLayer.input_rows`: a linear layer's inputs, a convolution's patches) into `X^T X` (float32). Positions
    where `mask` (the current batch's `[batch, seq]` attention mask, or None) is 0 are padding and left out.
    Modules that read the same tensor (a block's q/k/v projections, gate and up) share one product. `seen` holds
    the modules reached since it was last cleared. Use as a context manager."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.sums: dict[str, torch.Tensor] = {}
        self.rows = dict.fromkeys(self.modules, 0)
        self.mask: Optional[torch.Tensor] = None
        self.seen: set[str] = set()
        self._last: Optional[tuple] = None  # (input, its version, X^T X, rows) of the latest shareable call
        self._handles: list[Any] = []

    def __enter__(self) -> "MomentRecorder":
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._last = None
        for handle in self._handles:
            handle.remove()

    def _product(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        kind = type(module) if isinstance(module, MoMosLayer) else layer_class_for(module)
        # rows that depend on the input alone can be shared, while the input is unchanged (inference tensors
        # carry no version counter: never shared)
        version = None if x.is_inference() else x._version
        plain = kind.input_rows is MoMosLayer.input_rows and version is not None
        last = self._last
        if plain and last is not None and last[0] is x and last[1] == version:
            return last[2], last[3]
        rows = x.detach()
        if self.mask is not None and rows.dim() == 3 and tuple(rows.shape[:2]) == tuple(self.mask.shape):
            rows = rows[self.mask.bool()]
        rows = kind.input_rows(module, rows).float()
        product = rows.T @ rows
        self._last = (x, version, product, rows.shape[0]) if plain else None
        return product, rows.shape[0]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            product, rows = self._product(module, args[0])
            self.sums[name] = product.clone() if name not in self.sums else self.sums[name].add_(product)
            self.rows[name] += rows
            self.seen.add(name)

        return record

    def moments(self) -> dict[str, torch.Tensor]:
        """`{name: X^T X / rows}`; every module must have been reached, with finite inputs."""
        unseen = [name for name, rows in self.rows.items() if rows == 0]
        if unseen:
            raise ValueError(
                f"calibration_data never reached {unseen[:5]}{' ...' if len(unseen) > 5 else ''}; "
                "pass batches of model inputs (dicts with input_ids, ...) that run through these layers"
            )
        not_finite = [name for name in self.modules if not torch.isfinite(self.sums[name]).all()]
        if not_finite:
            raise ValueError(
                f"the calibration inputs of {not_finite[0]}{' ...' if len(not_finite) > 1 else ''} are not finite "
                "(NaN or inf, or too large for float32): check the model's weights and calibration_data"
            )
        return {name: self.sums[name] / self.rows[name] for name in self.modules}


def batch_on(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch of model inputs with its tensors on `device`."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in dict(batch).items()}


def calibration_inputs(model: nn.Module, index: int, batch: Any, device: torch.device) -> dict[str, Any]:
    """Calibration batch number `index` on `device`, refused in one line where the model would fail on it
    obscurely: not a dict of inputs, `input_ids` that are not integer ids of the model's vocabulary."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"calibration batch {index} is a {type(batch).__name__}, not a dict of model inputs")
    ids = batch.get("input_ids")
    if ids is not None:
        if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            kind = ids.dtype if torch.is_tensor(ids) else type(ids).__name__
            raise TypeError(f"calibration batch {index}: input_ids must be a tensor of integer token ids, not {kind}")
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocabulary = getattr(embeddings, "num_embeddings", None)
        if vocabulary is not None and ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids.long()))
            if low < 0 or high >= vocabulary:
                raise ValueError(
                    f"calibration batch {index}: input_ids hold ids {low}..{high}, outside the model's vocabulary "
                    f"of {vocabulary} tokens (0..{vocabulary - 1})"
                )
    return batch_on(batch, device)


def attention_mask_of(inputs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    mask = inputs.get("attention_mask")
    return mask if torch.is_tensor(mask) else None


class _Reached(Exception):
    """Raised by a hook when a batch has gone as far through the model as needed."""


@torch.no_grad()
def input_moments(model: nn.Module, names: list[str], batches: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Run `batches` (dicts of model inputs, as a tokenizer or a DataLoader gives them) through `model` and
    return, for each module in `names`, its input moment `[in, in]` (float32; see `MomentRecorder`).
    Memory is one `[in, in]` sum per layer, whatever the number of batches. A batch stops at the output
    embeddings (a language model's head, often the costliest layer) once every module has been reached."""
    device = next(model.parameters()).device
    head = output_embeddings(model)
    was_training = model.training
    model.eval()
    with MomentRecorder({name: model.get_submodule(name) for name in names}) as recorder:

        def stop_at_head(module: nn.Module, args: tuple) -> None:
            if len(recorder.seen) == len(recorder.modules):
                raise _Reached

        handle = (
            head.register_forward_pre_hook(stop_at_head)
            if head is not None and head not in recorder.modules.values()
            else None
        )
        try:
            for index, batch in enumerate(tqdm(batches, desc="MoMos calibration", unit="batch")):
                inputs = calibration_inputs(model, index, batch, device)
                recorder.mask = attention_mask_of(inputs)
                recorder.seen.clear()
                try:
                    model(**inputs)
                except _Reached:
                    pass
        finally:
            if handle is not None:
                handle.remove()
            model.train(was_training)
    return recorder.moments()


class ActivationStore:
    """The hidden states of the calibration batches between two blocks, by batch index: kept in memory up to
    `budget_bytes` in all, written to safetensors files in a temporary folder (under `folder`, default the
    system's) past it. `close()` removes that folder, which the store created and alone writes to."""

    def __init__(self, budget_bytes: int, folder: Optional[str] = None) -> None:
        self.budget_bytes = budget_bytes
        self.parent = folder
        self.in_memory: dict[int, torch.Tensor] = {}
        self.on_disk: dict[int, Path] = {}
        self.folder: Optional[Path] = None

    def __len__(self) -> int:
        return len(self.in_memory) + len(self.on_disk)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.in_memory.values())

    def __setitem__(self, index: int, hidden: torch.Tensor) -> None:
        self.in_memory.pop(index, None)
        size = hidden.numel() * hidden.element_size()
        if index not in self.on_disk and self.memory_bytes() + size <= self.budget_bytes:
            self.in_memory[index] = hidden.detach()
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="momos-activations-", dir=self.parent))
        path = self.folder / f"{index}.safetensors"
        save_file({"hidden": hidden.detach().cpu().contiguous()}, path)
        self.on_disk[index] = path

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self.in_memory:
            return self.in_memory[index]
        return load_file(self.on_disk[index])["hidden"]

    def close(self) -> None:
        self.in_memory.clear()
        self.on_disk.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _split_block_call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """A block's call as (hidden states, other positional arguments, keyword arguments)."""
    if args:
        return args[0], args[1:], dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects without a meaningful ==
        return False


@torch.no_grad()
def block_inputs(
    model: nn.Module,
    stack: nn.ModuleList,
    batches: list[Mapping[str, Any]],
    store: ActivationStore,
) -> list[tuple[tuple, dict[str, Any], Optional[torch.Tensor]]]:
    """Run each batch through `model` up to the first block of `stack`, put the hidden states it receives into
    `store` (by batch index) and return, per batch, the block's other arguments (positional after the hidden
    states, and keyword: attention mask, positions, ...) and the batch's attention mask.

    The first batch runs on to the output embeddings (or the end), to check on the way that every block runs
    exactly once and gets the same other arguments: blocks that share weights across depth (ALBERT's layer
    groups) or pass more than hidden states to the next (T5's position bias) cannot be run one at a time."""
    extras: list[tuple[tuple, dict[str, Any], Optional[torch.Tensor]]] = []
    calls = [0] * len(stack)
    device = next(model.parameters()).device

    def count(index: int):
        return lambda module, args: calls.__setitem__(index, calls[index] + 1)

    def first(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if calls[0] > 1:  # the first batch's block 0 again (weights shared across depth): refused after the batch
            return
        hidden, rest, kwargs = _split_block_call(args, kwargs)
        # the first batch runs on through the blocks, which might change their input in place
        store[len(extras)] = hidden.clone() if not extras else hidden
        extras.append((rest, kwargs, None))
        if len(extras) > 1:
            raise _Reached

    def second(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if calls[1] > 1:
            return
        _, rest, kwargs = _split_block_call(args, kwargs)
        first_rest, first_kwargs, _ = extras[0]
        differ = [
            f"argument {i + 2}"
            for i in range(max(len(rest), len(first_rest)))
            if i >= min(len(rest), len(first_rest)) or not _same(rest[i], first_rest[i])
        ]
        differ += sorted(k for k in set(kwargs) | set(first_kwargs) if not _same(kwargs.get(k), first_kwargs.get(k)))
        if differ:
            raise ValueError(
                f"the blocks of {type(model).__name__} do not all get the same arguments "
                f"({', '.join(differ)} differ from the first block's), so they cannot be "
                "calibrated one at a time: use sequential=False"
            )

    def stop_at_head(module: nn.Module, args: tuple) -> None:
        if all(calls):  # past every block (a model may also call its head's module before them, if shared)
            raise _Reached

    was_training = model.training
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False  # no key/value cache among the blocks' arguments
    checks = [block.register_forward_pre_hook(count(i)) for i, block in enumerate(stack)]
    if len(stack) > 1:
        checks.append(stack[1].register_forward_pre_hook(second, with_kwargs=True))
    head = output_embeddings(model)
    if head is not None and not any(head is m for block in stack for m in block.modules()):
        checks.append(head.register_forward_pre_hook(stop_at_head))
    handles = [stack[0].register_forward_pre_hook(first, with_kwargs=True)]
    try:
        for index, batch in enumerate(tqdm(batches, desc="MoMos calibration inputs", unit="batch")):
            inputs = calibration_inputs(model, index, batch, device)
            try:
                model(**inputs)
            except _Reached:
                pass
            if len(extras) <= index:
                raise ValueError("calibration_data never reached the first block of the model")
            rest, kwargs, _ = extras[-1]
            extras[-1] = (rest, kwargs, attention_mask_of(inputs))
            if checks:
                for handle in checks:
                    handle.remove()
                checks = []
                if any(n != 1 for n in calls):
                    raise ValueError(
                        f"the blocks of {type(model).__name__} run {sorted(set(calls))} times per forward, not once "
                        "each (weights shared across depth), so they cannot be calibrated one at a time: use "
                        "sequential=False"
                    )
    finally:
        for handle in handles + checks:
            handle.remove()
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    return extras


@torch.no_grad()
def run_block(
    block: nn.Module,
    store: ActivationStore,
    extras: list[tuple[tuple, dict[str, Any], Optional[torch.Tensor]]],
    recorder: Optional[MomentRecorder] = None,
    keep_outputs: bool = False,
) -> None:
    """Pass every stored hidden state through `block` with its batch's other arguments, recording moments with
    `recorder` if given; with `keep_outputs` the outputs replace the inputs in `store`."""
    was_training = block.training
    block.eval()
    try:
        for index, (rest, kwargs, mask) in enumerate(extras):
            if recorder is not None:
                recorder.mask = mask
            output = block(store[index], *rest, **kwargs)
            if keep_outputs:
                store[index] = output[0] if isinstance(output, (tuple, list)) else output
    finally:
        block.train(was_training)


@torch.no_grad()
def block_by_block(
    model: nn.Module,
    stack: nn.ModuleList,
    batches: list[Mapping[str, Any]],
    store: ActivationStore,
    measured: list[Mapping[str, nn.Module]],
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """GPTQ's sequential calibration: for each block `i` of `stack` whose `measured[i]` (modules to record) is not
    empty, yield `(i, their moments)` computed on the outputs of the blocks before it as they were when the
    caller resumed (converted, by then); then run block `i` as the caller left it to feed the next block."""
    extras = block_inputs(model, stack, batches, store)
    for i, block in enumerate(stack):
        if measured[i]:
            with MomentRecorder(measured[i]) as recorder:
                run_block(block, store, extras, recorder)
            yield i, recorder.moments()
        if i + 1 < len(stack):
            run_block(block, store, extras, keep_outputs=True)
