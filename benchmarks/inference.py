"""Inference speed and weight memory of MoMos layers and models vs dense ones, side by side in one run.

Layers (k=256, s=16/8/4, 1/8/32 input rows): square 512-4096 and Llama-7B's projections (4096x4096, gate/up
11008x4096, down 4096x11008). Dense: `nn.Linear` in float32 and bfloat16 (CPU) or float16 and bfloat16 (cuBLAS,
CUDA). MoMos: every product that runs on the device, forced one at a time (CPU: `compiled_lookup`, `lookup`,
`reconstruct`; CUDA: `triton_lookup`, `triton_matmul`, `reconstruct`), `auto` (what
`momos_hf.kernels.products.select_product` picks) and `cached` (a kept dense copy). Models: `generate` tokens/s at
batch 1, 8 and 32, dense vs MoMos (auto) vs MoMos (cached), on a 4-layer Llama (hidden 1024) built from a
config, SmolLM2-135M (real weights, `common.smollm2_path`, skipped where absent) and, with `--llama7b`,
Llama-2-7B's shapes (all 32 blocks on CUDA; 2 blocks on CPU).

The variants of one case run round-robin, `number` calls per sample, and each keeps its median, so a busy
neighbour slows them alike; ratios are to the first dense variant (below 1 = MoMos faster). `weight MiB` is
what the layers keep between calls (parameters and buffers). MoMos weights are random mosaics (layers) or a
`fit="sample"` conversion (models): speed does not depend on the fit.
Usage: python benchmarks/inference.py [--quick] [--device cuda] [--llama7b] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from common import smollm2_path, write_json
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.layer import MoMosLayer, MoMosLinear
from momos_hf.mosaic import reconstruct

K = 256
SQUARE = [(n, n) for n in (512, 1024, 2048, 4096)]
LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): attention, gate/up, down


def products_for(device: str) -> tuple[list[torch.dtype], list[str]]:
    """Dense dtypes (the first is the baseline) and the MoMos products that run on `device`."""
    if device == "cpu":
        return [torch.float32, torch.bfloat16], ["compiled_lookup", "lookup", "reconstruct"]
    return [torch.float16, torch.bfloat16], ["triton_lookup", "triton_matmul", "reconstruct"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def side_by_side(
    variants: dict[str, Callable[[], object]], device: str, repeats: int, number: int
) -> dict[str, float]:
    """Median seconds per call of each variant, sampled round-robin after one warm-up call each."""
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(times) for name, times in samples.items()}


def held_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    cached = [
        m._weight_cache[1] for m in module.modules() if isinstance(m, MoMosLayer) and m._weight_cache is not None
    ]
    return sum(t.numel() * t.element_size() for t in tensors + cached)


def momos_layer(out_features: int, in_features: int, s: int, dtype: torch.dtype, device: str) -> MoMosLinear:
    g = torch.Generator().manual_seed(out_features * 7 + in_features + s)
    motifs = torch.nn.Parameter(torch.randn(K, s, generator=g).div(s**0.5).to(device, dtype))
    mosaic = torch.randint(0, K, (out_features, in_features // s), generator=g).to(torch.uint8).to(device)
    return MoMosLinear(in_features, out_features, motifs, mosaic).requires_grad_(False)


def run_momos(layer: MoMosLinear, x: torch.Tensor, product: str) -> torch.Tensor:
    layer.product, layer.weight_cache_enabled = (
        (None, True) if product == "cached" else (None if product == "auto" else product, False)
    )
    return layer(x)


@torch.no_grad()
def layer_benchmark(shapes, block_sizes, row_counts, device: str, repeats: int, number: int) -> list[dict]:
    dense_dtypes, products = products_for(device)
    rows = []
    print(
        f"{'out':>6} {'in':>6} {'s':>3} {'rows':>4} {'variant':<24} {'ms':>9} {'x dense':>8} {'weight MiB':>10} "
        f"{'x less':>7}"
    )
    for out_features, in_features in shapes:
        for s in block_sizes:
            momos = momos_layer(out_features, in_features, s, dense_dtypes[0], device)
            weight = reconstruct(momos.motifs, momos.mosaic, in_features)
            dense = {}
            for dtype in dense_dtypes:
                dense[dtype] = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
                dense[dtype].weight.copy_(weight)
            for count in row_counts:
                x = torch.randn(count, in_features, generator=torch.Generator().manual_seed(count)).to(
                    device, dense_dtypes[0]
                )
                variants = {
                    f"dense {str(d).removeprefix('torch.')}": (lambda d=d: dense[d](x.to(d)), dense[d])
                    for d in dense_dtypes
                }
                for product in [*products, "auto", "cached"]:
                    variants[f"momos {product}"] = (lambda p=product: run_momos(momos, x, p), momos)
                expected = dense[dense_dtypes[0]](x).float()
                for name, (fn, _) in variants.items():  # every variant computes the same product (to 16-bit rounding)
                    error = (fn().float() - expected).norm() / expected.norm()
                    assert error < 1e-2, f"{name} is off by {error:.2g}"
                seconds = side_by_side({name: fn for name, (fn, _) in variants.items()}, device, repeats, number)
                base_seconds = base_weight = None
                for name, (_, module) in variants.items():
                    if name == "momos cached":
                        run_momos(momos, x, "cached")
                    weight_bytes = held_bytes(module)
                    momos.weight_cache_enabled, momos._weight_cache = False, None
                    base_seconds, base_weight = base_seconds or seconds[name], base_weight or weight_bytes
                    row = dict(
                        out=out_features,
                        **{"in": in_features},
                        s=s,
                        rows=count,
                        variant=name,
                        ms=seconds[name] * 1e3,
                        vs_dense=seconds[name] / base_seconds,
                        weight_mib=weight_bytes / 2**20,
                        memory_saving=base_weight / weight_bytes,
                    )
                    rows.append(row)
                    print(
                        f"{out_features:>6} {in_features:>6} {s:>3} {count:>4} {name:<24} {row['ms']:>9.3f} "
                        f"{row['vs_dense']:>8.2f} "
                        f"{row['weight_mib']:>10.2f} {row['memory_saving']:>7.1f}",
                        flush=True,
                    )
    return rows


@torch.no_grad()
def model_benchmark(
    name: str, build: Callable[[], torch.nn.Module], batches, new_tokens: int, device: str, repeats: int, s: int = 16
) -> list[dict]:
    """`generate` tokens/s of the dense model, its MoMos conversion (k=256, `s`) with automatic products, and
    with cached weights."""
    dense = build().to(device).eval()
    momos = get_momos_model(build().to(device).eval(), MoMosConfig(k=K, s=s, fit="sample"))
    vocab = dense.config.vocab_size
    rows = []
    print(f"\n{name}: generate {new_tokens} tokens (greedy), k={K}, s={s}")
    print(f"{'batch':>5} {'model':<14} {'tokens/s':>9} {'x dense':>8} {'weight MiB':>10} {'x less':>7}")
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)

        def generate(model, cache):
            def run():
                if hasattr(model, "cache_weights"):
                    model.cache_weights(cache)
                model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            return run

        variants = {"dense": (dense, False), "momos auto": (momos, False), "momos cached": (momos, True)}
        seconds = side_by_side({label: generate(m, c) for label, (m, c) in variants.items()}, device, repeats, 1)
        base = None
        for label, (model, cache) in variants.items():
            if hasattr(model, "cache_weights"):
                model.cache_weights(cache)
                model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False)  # fills the cache to count it
            weight = held_bytes(model)
            rate = batch * new_tokens / seconds[label]
            base = base or (rate, weight)
            rows.append(
                dict(
                    model_name=name,
                    batch=batch,
                    model=label,
                    tokens_per_second=rate,
                    speed_vs_dense=rate / base[0],
                    weight_mib=weight / 2**20,
                    memory_saving=base[1] / weight,
                )
            )
            print(
                f"{batch:>5} {label:<14} {rate:>9.1f} {rate / base[0]:>8.2f} {weight / 2**20:>10.1f} "
                f"{base[1] / weight:>7.2f}",
                flush=True,
            )
        momos.cache_weights(False)
    return rows


def llama(
    layers: int, hidden: int, intermediate: int, vocab: int, dtype: torch.dtype
) -> Callable[[], torch.nn.Module]:
    def build():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
        )
        return LlamaForCausalLM(config).to(dtype)

    return build


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, few repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--llama7b", action="store_true", help="also generate with Llama-2-7B's shapes (random weights)"
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    dtype = products_for(args.device)[0][0]
    if args.quick:
        layer_rows = layer_benchmark([(256, 512)], [16], [1, 8], args.device, 3, 2)
        model_rows = model_benchmark(
            "Llama 1 layer, hidden 256", llama(1, 256, 704, 8192, dtype), [1], 4, args.device, 1
        )
    else:
        layer_rows = layer_benchmark(
            list(dict.fromkeys(SQUARE + LLAMA_7B)), [16, 8, 4], [1, 8, 32], args.device, 15, 5
        )
        model_rows = model_benchmark(
            "Llama 4 layers, hidden 1024", llama(4, 1024, 2816, 8192, dtype), [1, 8, 32], 32, args.device, 3
        )
        try:
            path = smollm2_path()
        except SystemExit as missing:
            print(f"\nSmolLM2-135M skipped: {missing}")
        else:
            smollm2 = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            model_rows += model_benchmark("SmolLM2-135M", smollm2, [1, 8, 32], 32, args.device, 3)
        if args.llama7b:
            blocks = 32 if args.device == "cuda" else 2
            model_rows += model_benchmark(
                f"Llama-2-7B shapes, {blocks} blocks",
                llama(blocks, 4096, 11008, 32000, dtype),
                [1, 16],
                32,
                args.device,
                3,
                s=8,
            )
    results = {"device": args.device, "threads": torch.get_num_threads(), "layers": layer_rows, "model": model_rows}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
