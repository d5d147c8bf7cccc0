"""Inference speed and weight memory of MoMos layers vs dense `nn.Linear`, side by side in one run.

Per layer (square, hidden 512-4096, k=256, s=16): dense fp32 and bf16 `nn.Linear` vs the three MoMos
products, forced one at a time: `lookup` (table of input chunks x motifs, summed by the mosaic),
`reconstruct` (rebuild the weight, one matmul, free it) and `cached` (a kept dense copy), plus `auto`
(what `momos_hf.products.select_product` picks). Whole model: `generate` of 32 new tokens at batch 1 and 32 on a Llama built
from a config, dense vs MoMos (auto) vs MoMos (cached). Times are medians of repeated runs on whatever
device is given; `weight MiB` is what the layers keep between calls (parameters and buffers), `work MiB`
the largest temporary a product allocates (from its shapes).
Usage: python benchmarks/inference.py [--quick] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_json
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.fitting import reconstruct
from momos_hf.layer import MoMosLayer, MoMosLinear
from momos_hf.products import MIN_TABLE_WIDTH, lookup_product, select_product

K, S = 256, 16


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def held_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    cached = [m._weight_cache[1] for m in module.modules() if isinstance(m, MoMosLayer) and m._weight_cache is not None]
    return sum(t.numel() * t.element_size() for t in tensors + cached)


def momos_layer(size: int, device: str) -> MoMosLinear:
    g = torch.Generator().manual_seed(size)
    motifs = torch.nn.Parameter(torch.randn(K, S, generator=g).to(device))
    mosaic = torch.randint(0, K, (size, size // S), generator=g).to(torch.uint8).to(device)
    return MoMosLinear(size, size, motifs, mosaic).requires_grad_(False)


def working_bytes(path: str, size: int, tokens: int, device: str) -> int:
    nb = size // S
    if path == "auto":
        path = select_product(torch.empty(tokens, size, device="meta" if device != "cpu" else "cpu"), size, size)
    if path == "lookup":
        return nb * K * max(tokens, MIN_TABLE_WIDTH) * 4 + size * nb * 4  # table + int32 block offsets
    if path == "reconstruct":
        return size * size * 4
    return 0


@torch.no_grad()
def layer_benchmark(sizes, token_counts, device: str, repeats: int) -> list[dict]:
    rows = []
    print(f"{'hidden':>6} {'tokens':>6} {'path':<16} {'ms':>8} {'x dense':>8} {'weight MiB':>10} {'x less':>7} {'work MiB':>8}")
    for size in sizes:
        momos = momos_layer(size, device)
        dense = torch.nn.Linear(size, size, bias=False, device=device)
        dense.weight.copy_(reconstruct(momos.motifs, momos.mosaic, size))
        dense_bf16 = torch.nn.Linear(size, size, bias=False, device=device, dtype=torch.bfloat16)
        dense_bf16.weight.copy_(dense.weight)
        for tokens in token_counts:
            x = torch.randn(tokens, size, device=device)
            torch.testing.assert_close(lookup_product(x, momos.motifs, momos.mosaic, None, size), dense(x), rtol=1e-3, atol=1e-3)
            variants = {"dense fp32": (lambda: dense(x), dense), "dense bf16": (lambda: dense_bf16(x.bfloat16()), dense_bf16)}
            for path in ("lookup", "reconstruct", "auto"):
                variants[f"momos {path}"] = (lambda p=path: _forced(momos, x, p), momos)
            variants["momos cached"] = (lambda: _cached(momos, x), momos)
            base = None
            for name, (fn, module) in variants.items():
                seconds = timed(fn, device, repeats)
                weight = held_bytes(module)
                base = base or (seconds, weight)
                work = working_bytes(name.split()[-1], size, tokens, device) if name.startswith("momos") else 0
                rows.append(dict(hidden=size, tokens=tokens, path=name, ms=seconds * 1e3, vs_dense=seconds / base[0],
                                 weight_mib=weight / 2**20, memory_saving=base[1] / weight, work_mib=work / 2**20))
                r = rows[-1]
                print(f"{size:>6} {tokens:>6} {name:<16} {r['ms']:>8.3f} {r['vs_dense']:>8.2f} {r['weight_mib']:>10.2f} "
                      f"{r['memory_saving']:>7.1f} {r['work_mib']:>8.2f}", flush=True)
            momos.weight_cache_enabled, momos._weight_cache = False, None
    return rows


def _forced(momos: MoMosLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    momos.product = None if path == "auto" else path  # the layer's own override
    return momos(x)


def _cached(momos: MoMosLinear, x: torch.Tensor) -> torch.Tensor:
    momos.product, momos.weight_cache_enabled = None, True
    return momos(x)


@torch.no_grad()
def model_benchmark(layers: int, hidden: int, batches, new_tokens: int, device: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    dense = LlamaForCausalLM(config).to(device).eval()
    dense_bytes = held_bytes(dense)
    momos = get_momos_model(LlamaForCausalLM(config).to(device).eval(), MoMosConfig(k=K, s=S, fit="sample"))
    rows = []
    print(f"\nLlama {layers} layers, hidden {hidden}: generate {new_tokens} tokens (greedy)")
    print(f"{'batch':>5} {'model':<14} {'tokens/s':>9} {'x dense':>8} {'weight MiB':>10} {'x less':>7}")
    for batch in batches:
        prompt = torch.randint(0, 8192, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)
        base = None
        for name, model, cache in (("dense fp32", dense, False), ("momos auto", momos, False), ("momos cached", momos, True)):
            if hasattr(model, "cache_weights"):
                model.cache_weights(cache)

            def run():
                model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            seconds = timed(run, device, repeats)
            weight = held_bytes(model)
            rate = batch * new_tokens / seconds
            base = base or (rate, weight)
            rows.append(dict(batch=batch, model=name, tokens_per_second=rate, speed_vs_dense=rate / base[0],
                             weight_mib=weight / 2**20, memory_saving=dense_bytes / weight))
            print(f"{batch:>5} {name:<14} {rate:>9.1f} {rate / base[0]:>8.2f} {weight / 2**20:>10.1f} {dense_bytes / weight:>7.2f}", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, few repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    if args.quick:
        layer_rows = layer_benchmark([512], [1, 32], args.device, 3)
        model_rows = model_benchmark(1, 256, [1], 4, args.device, 1)
    else:
        layer_rows = layer_benchmark([512, 1024, 2048, 4096], [1, 8, 32], args.device, 20)
        model_rows = model_benchmark(4, 1024, [1, 32], 32, args.device, 3)
    results = {"device": args.device, "threads": torch.get_num_threads(), "layers": layer_rows, "model": model_rows}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
