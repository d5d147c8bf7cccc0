"""Calibration: stream a model's inputs to its target layers into each layer's input moment
`H = X^T X / rows`, the metric of data-aware fitting (`momos_hf.data_aware`)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .layer import layer_class_for


@torch.no_grad()
def input_moments(model: nn.Module, names: list[str], batches: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Run `batches` (dicts of model inputs, as a tokenizer or a DataLoader gives them) through `model`
    and return, for each module in `names`, the mean outer product `[in, in]` (float32) of the rows its
    matrix multiplies (`MoMosLayer.input_rows`: a linear layer's inputs, a convolution's patches).

    Memory is one `[in, in]` sum per layer, whatever the number of batches. Where a batch has an
    `attention_mask` of the inputs' `[batch, seq]` shape, padding positions are left out.
    """
    sums: dict[str, torch.Tensor] = {}
    rows = dict.fromkeys(names, 0)
    mask: list[torch.Tensor] = []  # the current batch's attention mask, read by the hooks

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if mask and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask[0].shape):
                x = x[mask[0].bool()]
            x = layer_class_for(module).input_rows(module, x).float()
            sums[name] = x.T @ x if name not in sums else sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="MoMos calibration", unit="batch"):
            inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in dict(batch).items()}
            mask[:] = [inputs["attention_mask"]] if torch.is_tensor(inputs.get("attention_mask")) else []
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unseen = [name for name in names if rows[name] == 0]
    if unseen:
        raise ValueError(f"calibration_data never reached {unseen[:5]}{' ...' if len(unseen) > 5 else ''}; "
                         "pass batches of model inputs (dicts with input_ids, ...) that run through these layers")
    return {name: sums[name] / rows[name] for name in names}
