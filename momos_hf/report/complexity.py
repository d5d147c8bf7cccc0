"""Size, description length and complexity of a MoMos model.

Description length of one dictionary (the bound of Bakhtiarifard et al., arXiv 2602.14896):
    DL = k * s * b_motif + n_blocks * ceil(log2 k)   bits,
plus the row scales of the layers that have them and every untouched parameter at its storage width
(`momos_hf.mosaic.description_bits`, the one place the formula lives).
Complexity figures are measured on the float32 bytes of the converted layers' weights: lossless
compression ratios (raw bytes / compressed bytes) and BDM over their sign bits (needs `pybdm`).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

from ..checkpoint.schema import layer_specs
from ..convert.converter import VECTOR_MOSAICS
from ..layer import MoMosLayer, momos_layers
from ..mosaic import description_bits

DEFAULT_MAX_BYTES = 4 * 2**20


@dataclass
class LayerStats:
    """Size of one MoMos layer. `dictionary_bits` is 0 when the dictionary is shared (counted once in
    `ComplexityReport.shared_dictionary_bits`)."""

    name: str
    shape: tuple[int, int]
    params: int
    blocks: int
    k: int
    s: int
    mosaic_bits: int
    dictionary_bits: int
    scale_bits: int
    rel_error: Optional[float]
    usage_entropy: float

    @property
    def description_length_bits(self) -> int:
        return self.mosaic_bits + self.dictionary_bits + self.scale_bits

    @property
    def bits_per_weight(self) -> float:
        return self.description_length_bits / self.params


@dataclass
class ComplexityReport:
    """Per-layer and total sizes, and complexity figures of the converted weights."""

    layers: list[LayerStats]
    shared_dictionary_bits: int
    other_params: int
    other_bits: int
    compression_ratios: dict[str, float] = field(default_factory=dict)
    measured_bytes: int = 0
    bdm_bits: Optional[float] = None
    bdm_sign_bits: int = 0

    @property
    def converted_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def converted_bits(self) -> int:
        return sum(layer.description_length_bits for layer in self.layers) + self.shared_dictionary_bits

    @property
    def bits_per_weight(self) -> float:
        """Bits per converted weight, dictionaries and scales included."""
        return self.converted_bits / self.converted_params

    @property
    def total_params(self) -> int:
        """Every parameter, each MoMos matrix (and constrained vector) counted as the dense weights it stands for:
        the `all params` of `MoMosModel.print_trainable_parameters` and the parameters of `momos-hf info`."""
        return self.converted_params + self.other_params

    @property
    def total_bits(self) -> int:
        return self.converted_bits + self.other_bits

    def to_dict(self) -> dict:
        totals = {
            "converted_params": self.converted_params,
            "converted_description_length_bits": self.converted_bits,
            "bits_per_weight": self.bits_per_weight,
            "ratio_vs_fp32": 32 / self.bits_per_weight,
            "ratio_vs_fp16": 16 / self.bits_per_weight,
            "total_params": self.total_params,
            "total_description_length_bits": self.total_bits,
        }
        layers = [
            dict(asdict(l), description_length_bits=l.description_length_bits, bits_per_weight=l.bits_per_weight)
            for l in self.layers
        ]
        return {**asdict(self), "layers": layers, "totals": totals}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self, per_layer: bool = True) -> str:
        """A plain-text table for the console."""
        lines = []
        if per_layer:
            head = (
                f"{'layer':<44} {'shape':>11} {'k':>6} {'s':>3} {'bits/w':>7} {'DL KiB':>9} {'x fp32':>7} "
                f"{'x fp16':>7} {'rel.err':>7} {'use H':>6}"
            )
            lines += [head, "-" * len(head)]
            for l in self.layers:
                err = "-" if l.rel_error is None else f"{l.rel_error:.3f}"
                lines.append(
                    f"{l.name[-44:]:<44} {l.shape[0]:>5}x{l.shape[1]:<5} {l.k:>6} {l.s:>3} {l.bits_per_weight:>7.3f} "
                    f"{l.description_length_bits / 8192:>9.1f} {32 / l.bits_per_weight:>7.1f} "
                    f"{16 / l.bits_per_weight:>7.1f} "
                    f"{err:>7} {l.usage_entropy:>6.2f}"
                )
            lines.append("")
        mib = 8 * 2**20
        total_params = self.total_params
        lines += [
            f"parameters           {total_params:,d} ({self.converted_params:,d} in mosaics, counted as the dense "
            f"weights they stand for; {self.other_params:,d} other)",
            f"converted layers     {len(self.layers)} ({self.converted_params / total_params:.1%} of parameters)",
            f"bits per weight      {self.bits_per_weight:.4f} (mosaic, dictionaries and scales)",
            f"converted size       {self.converted_bits / mib:.3f} MiB = {32 / self.bits_per_weight:.1f}x smaller "
            f"than fp32, {16 / self.bits_per_weight:.1f}x than fp16",
            f"whole model          {self.total_bits / mib:.3f} MiB vs {32 * total_params / mib:.3f} MiB fp32 "
            f"({32 * total_params / self.total_bits:.2f}x)",
        ]
        if self.compression_ratios:
            ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in self.compression_ratios.items())
            lines.append(
                f"lossless compression {ratios} (on {self.measured_bytes / 2**20:.2f} MiB of float32 weights)"
            )
        if self.bdm_bits is not None:
            lines.append(
                f"BDM of sign bits     {self.bdm_bits:,.0f} bits over {self.bdm_sign_bits:,d} signs "
                f"({self.bdm_bits / self.bdm_sign_bits:.4f} bits/sign)"
            )
        return "\n".join(lines)


def usage_entropy(mosaic: torch.Tensor, k: int) -> float:
    """Shannon entropy (bits) of motif use: what an ideal entropy coder spends per mosaic entry."""
    counts = torch.bincount(mosaic.flatten().long(), minlength=k).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def compression_ratios(data: bytes) -> dict[str, float]:
    """Raw size / compressed size for gzip, bz2, lzma (level 9) and zstd (level 19, if installed)."""
    ratios = {
        "gzip": len(data) / len(gzip.compress(data, compresslevel=9)),
        "bz2": len(data) / len(bz2.compress(data, compresslevel=9)),
        "lzma": len(data) / len(lzma.compress(data, preset=9)),
    }
    try:
        import zstandard
    except ImportError:
        return ratios
    ratios["zstd"] = len(data) / len(zstandard.ZstdCompressor(level=19).compress(data))
    return ratios


BDM_2D_WIDTH = 256  # 2-D BDM reads the signs as rows of 256 (a multiple of its 4x4 blocks)


def bdm_of_signs(values: torch.Tensor, ndim: int = 1) -> Optional[float]:
    """BDM (bits) of the sign bits of `values`, or `None` when `pybdm` is not installed.

    `ndim=1`: the flattened signs in blocks of 12 (as the reference code); `ndim=2`: the signs laid out in
    rows of `BDM_2D_WIDTH`, in 4x4 blocks (an incomplete last row is dropped)."""
    try:
        with warnings.catch_warnings():  # pybdm imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            from pybdm import BDM
    except ImportError:  # optional extra: pip install "momos-hf[bdm]"
        return None
    signs = (values.detach().flatten().cpu() > 0).numpy().astype(np.int64)
    if ndim == 2:
        rows = len(signs) // BDM_2D_WIDTH
        if rows < 4:
            raise ValueError(f"2-D BDM needs at least {4 * BDM_2D_WIDTH} values, got {len(signs)}")
        signs = signs[: rows * BDM_2D_WIDTH].reshape(rows, BDM_2D_WIDTH)
    return float(BDM(ndim=ndim).bdm(signs))


def histogram_entropy(values: torch.Tensor, bins: int = 256) -> float:
    """Shannon entropy (bits per value) of the histogram of `values` over `bins` equal-width bins
    spanning their range: the seeds' entropy baseline for BDM."""
    values = values.detach().flatten().float().cpu()
    counts = torch.histc(values, bins=bins, min=float(values.min()), max=float(values.max())).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def complexity_report(
    model: torch.nn.Module,
    fit_errors: Optional[dict[str, float]] = None,
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES,
) -> ComplexityReport:
    """Report on every MoMos layer of `model` (a `MoMosModel`, or the model it wraps); a tied layer is
    counted with the layer it is tied to, whose matrix it uses.

    `fit_errors` (layer name -> relative error at fit time) fills the error column (default: what each
    layer records). Compressors and BDM read at most `max_bytes` of weights (`None`: all; `0`: skip them),
    rebuilt layer by layer until that much is there.
    """
    if callable(getattr(model, "get_base_model", None)):  # a MoMosModel, or a PEFT model around one
        model = model.get_base_model()
    vector_mosaics = getattr(model, VECTOR_MOSAICS, {})  # the 1-D parameters under constrain_vectors
    momos = momos_layers(model)
    if not momos:
        raise ValueError(f"{type(model).__name__} has no MoMos layers to report on (convert it with get_momos_model)")
    specs = layer_specs(model)
    users = Counter(spec.motifs for name, spec in specs.items() if spec.mosaic == name)
    leaders = {name: layer for name, layer in momos.items() if specs[name].mosaic == name}
    layers = []
    for name, layer in leaders.items():
        spec = specs[name]
        mosaic_bits, dictionary_bits, scale_bits = spec.description_bits(
            name, 0 if layer.scale is None else _bits(layer.scale) // layer.out_features
        )
        layers.append(
            LayerStats(
                name=name,
                shape=(spec.out_features, spec.in_features),
                params=spec.out_features * spec.in_features,
                blocks=spec.num_blocks,
                k=spec.k,
                s=spec.s,
                mosaic_bits=mosaic_bits,
                dictionary_bits=0 if users[spec.motifs] > 1 else dictionary_bits,
                scale_bits=scale_bits,
                rel_error=(fit_errors if fit_errors is not None else {}).get(name, layer.fit_error),
                usage_entropy=usage_entropy(layer.mosaic, layer.k),
            )
        )
    shared = [specs[owner] for owner, count in users.items() if count > 1]
    shared_bits = sum(spec.dictionary.bits(spec.k, spec.s) for spec in shared)
    dictionary = next(iter(leaders.values()))  # constrain_vectors has one dictionary
    vectors = {name: model.get_parameter(name) for name in vector_mosaics}
    for name, mosaic in vector_mosaics.items():
        layers.append(
            LayerStats(
                name=name,
                shape=(1, vectors[name].numel()),
                params=vectors[name].numel(),
                blocks=mosaic.numel(),
                k=dictionary.k,
                s=dictionary.s,
                mosaic_bits=description_bits(1, vectors[name].numel(), dictionary.k, dictionary.s, None)[0],
                dictionary_bits=0,
                scale_bits=0,
                rel_error=None,
                usage_entropy=usage_entropy(mosaic, dictionary.k),
            )
        )
    # Motifs and scales are in the layers' DL, latent weights are never saved; biases count as other parameters
    # unless constrained (their mosaics are then counted above).
    momos_params = {
        id(p) for layer in momos.values() for p in (layer.motifs, layer.scale, layer.latent) if p is not None
    }
    momos_params |= {id(p) for p in vectors.values()}
    others = [p for p in model.parameters() if id(p) not in momos_params]
    report = ComplexityReport(layers, shared_bits, sum(p.numel() for p in others), sum(_bits(p) for p in others))
    if max_bytes != 0:
        weights = _leading_weights(leaders.values(), None if max_bytes is None else max_bytes // 4)
        report.compression_ratios = compression_ratios(weights.numpy().tobytes())
        report.measured_bytes = weights.numel() * 4
        report.bdm_bits = bdm_of_signs(weights)
        report.bdm_sign_bits = weights.numel() if report.bdm_bits is not None else 0
    return report


@torch.no_grad()
def _leading_weights(layers: Iterable[MoMosLayer], max_values: Optional[int]) -> torch.Tensor:
    """The first `max_values` values (all: `None`) of the layers' mosaic weights, in float32, rebuilding only
    as many layers as that takes."""
    parts, count = [], 0
    for layer in layers:
        if max_values is not None and count >= max_values:
            break
        values = layer.mosaic_weight(torch.float32).flatten().cpu()
        parts.append(values if max_values is None else values[: max_values - count])
        count += parts[-1].numel()
    return torch.cat(parts)


def _bits(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8
