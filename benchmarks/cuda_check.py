"""CUDA check of the core and the checkpoint path, and fit speed on the GPU vs the CPU, side by side.

Converts a Llama built from a config on the GPU (fp32 and bf16), runs forward/backward, saves the compact
checkpoint and loads it back onto the GPU with `from_pretrained(..., device_map="cuda")`, comparing logits;
checks the compiled Triton kernels (forward and backward, three dtypes, k up to 65536) against the reference
product; then times `fit_weight_space` (k-means) on one 4096x4096 matrix (k=256, s=16, 15 Lloyd steps) on CPU and GPU.
Usage (on a machine with a GPU): python benchmarks/cuda_check.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.fit.weight_space import FitOptions, fit_weight_space
from momos_hf.mosaic import reconstruct, relative_error


def check_model(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).to("cuda", dtype)
    start = time.perf_counter()
    mm = get_momos_model(model, MoMosConfig(k=256, s=16, scale=True))
    torch.cuda.synchronize()
    fit_seconds = time.perf_counter() - start
    layer = mm.base_model.model.layers[0].mlp.up_proj
    assert layer.motifs.is_cuda and layer.mosaic.is_cuda and layer.motifs.dtype == dtype
    ids = torch.randint(0, 512, (2, 32), device="cuda")
    out = mm(input_ids=ids, labels=ids)
    out.loss.backward()
    assert layer.motifs.grad is not None and torch.isfinite(out.logits).all()
    with tempfile.TemporaryDirectory() as folder:
        mm.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", dtype=dtype)
        with torch.no_grad():
            same = torch.equal(loaded(input_ids=ids).logits, mm(input_ids=ids).logits)
    print(
        f"{str(dtype):<15} fit {fit_seconds:.2f} s, loss {out.loss.item():.3f}, reload on cuda identical logits: "
        f"{same}"
    )


def check_triton(device: str = "cuda") -> None:
    """Every Triton product, compiled for this GPU, against `x @ (scale * motifs[mosaic])^T` in float64
    (`device="cpu"` with TRITON_INTERPRET=1 runs the same check through triton's interpreter)."""
    from momos_hf.kernels.products import PRODUCTS
    from momos_hf.mosaic import index_dtype

    for name in ("triton_lookup", "triton_matmul"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for k, s, rows in ((256, 16, 1), (256, 4, 16), (65536, 8, 200)):
                g = torch.Generator().manual_seed(k + s)
                motifs = torch.randn(k, s, generator=g).div(s**0.5).to(device, dtype).requires_grad_()
                mosaic = torch.randint(0, k, (1000, 1000 // s + 1), generator=g).to(index_dtype(k)).to(device)
                scale = (torch.rand(1000, generator=g) + 0.5).to(device, dtype).requires_grad_()
                x = torch.randn(rows, 1000, generator=g).to(device, dtype).requires_grad_()
                y = PRODUCTS[name](x, motifs, mosaic, scale, 1000)
                y.square().sum().backward()
                leaves = [t.detach().double().requires_grad_() for t in (x, motifs, scale)]
                expected = leaves[0] @ reconstruct(leaves[1], mosaic, 1000, leaves[2]).T
                expected.square().sum().backward()
                errors = [
                    ((a.double() - b).norm() / b.norm()).item()
                    for a, b in (
                        (y, expected),
                        (x.grad, leaves[0].grad),
                        (motifs.grad, leaves[1].grad),
                        (scale.grad, leaves[2].grad),
                    )
                ]
                print(
                    f"{name:<14} {str(dtype):<15} k={k:<6} s={s:<3} rows={rows:<4} relative error "
                    "y/dx/dmotifs/dscale: " + " ".join(f"{e:.1e}" for e in errors)
                )


def time_fit(device: str) -> tuple[float, float]:
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(device)
    fit_weight_space([weight], FitOptions(k=256, s=16, iters=1))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fit = fit_weight_space([weight], FitOptions(k=256, s=16, iters=15))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, relative_error(weight, reconstruct(fit.motifs, fit.mosaics[0], 4096))


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "cuda_check.py: error: no CUDA device here (it checks the GPU paths; run it on a GPU machine)"
        )
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for dtype in (torch.float32, torch.bfloat16):
        check_model(dtype)
    check_triton()
    cpu_seconds, cpu_error = time_fit("cpu")
    gpu_seconds, gpu_error = time_fit("cuda")
    print(
        f"fit 4096x4096, k=256, s=16, 15 Lloyd steps: CPU {cpu_seconds:.2f} s (rel.err {cpu_error:.4f}), "
        f"GPU {gpu_seconds:.2f} s (rel.err {gpu_error:.4f}): GPU {cpu_seconds / gpu_seconds:.1f}x faster, "
        f"{16.8e6 / gpu_seconds / 1e6:.1f} Mweights/s"
    )


if __name__ == "__main__":
    main()
