"""The compiled CPU lookup (built here with the machine's C++ compiler) and the Triton kernels (run on the CPU by
triton's interpreter: conftest sets TRITON_INTERPRET=1; no GPU is needed), against the float64 reference
product `x @ (scale * motifs[mosaic])^T`, forward and backward: odd shapes, padded rows, k from 2 to 70000
(uint8, uint16 and int32 mosaics), 16-bit inputs, a dictionary shared by two layers."""

import ctypes
import hashlib
import importlib.util
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch

from momos_hf.kernels.products import PRODUCTS, select_product
from momos_hf.layer import MoMosLinear
from momos_hf.mosaic import index_dtype, reconstruct

# (k, s, in_features, out_features, rows): last blocks padded (37 % 8, 10 % 3, 30 % 8), group remainders (9, 17 rows)
CASES = [
    (256, 8, 37, 24, 1),
    (256, 16, 64, 40, 9),
    (16, 5, 37, 24, 17),
    (2, 3, 10, 7, 1),
    (300, 4, 64, 33, 3),
    (65536, 4, 64, 33, 2),
    (70000, 8, 30, 20, 32),
]


def mosaic_case(k, s, in_features, out_features, rows, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, s, generator=g).to(dtype)
    mosaic = torch.randint(0, k, (out_features, -(-in_features // s)), generator=g).to(index_dtype(k))
    scale = (torch.rand(out_features, generator=g) + 0.5).to(dtype)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    return x, motifs, mosaic, scale


def relative_error(value, reference):
    return ((value.double() - reference).abs().max() / reference.abs().max()).item()


needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler here")


@needs_compiler
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_scale", [True, False])
def test_compiled_lookup_equals_the_reference(case, with_scale):
    x, motifs, mosaic, scale = mosaic_case(*case)
    scale = scale if with_scale else None
    reference = x.double() @ reconstruct(motifs.double(), mosaic, case[2], None if scale is None else scale.double()).T
    assert mosaic.dtype == {256: torch.uint8, 300: torch.uint16, 65536: torch.uint16, 70000: torch.int32}.get(
        case[0], torch.uint8
    )
    y = PRODUCTS["compiled_lookup"](x, motifs, mosaic, scale, case[2])
    assert y.dtype == x.dtype and y.shape == reference.shape
    assert relative_error(y, reference) < 1e-5


@needs_compiler
def test_compiled_lookup_keeps_leading_dimensions_and_16_bit_inputs():
    x, motifs, mosaic, scale = mosaic_case(256, 8, 37, 24, 6, dtype=torch.bfloat16)
    y = PRODUCTS["compiled_lookup"](x.view(2, 3, 37), motifs, mosaic, scale, 37)
    reference = x.double() @ reconstruct(motifs.double(), mosaic, 37, scale.double()).T
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    assert relative_error(y.view(6, 24), reference) < 1e-2  # bfloat16 rounding of the output


@needs_compiler
def test_compiled_lookup_refuses_to_train():
    x, motifs, mosaic, scale = mosaic_case(16, 5, 37, 24, 2)
    with pytest.raises(RuntimeError, match="no backward"):
        PRODUCTS["compiled_lookup"](x, motifs.requires_grad_(), mosaic, scale, 37)


def build_into(cache, queue):
    os.environ["MOMOS_HF_KERNEL_CACHE"] = cache
    from momos_hf.kernels import cpu

    queue.put(str(cpu.build(os.environ.get("CXX", "c++"))))


@pytest.mark.slow
@needs_compiler
def test_concurrent_builds_leave_one_whole_library(tmp_path):
    """Two processes building at once (as two ranks of a job would): both load the same complete file."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=build_into, args=(str(tmp_path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    paths = {queue.get(timeout=10), queue.get(timeout=10)}
    library = Path(paths.pop())
    record = library.with_suffix(".sha256")
    assert not paths and sorted(tmp_path.iterdir()) == sorted([library, record])  # no scratch left behind
    assert record.read_text() == hashlib.sha256(library.read_bytes()).hexdigest()
    ctypes.CDLL(str(library))


@pytest.mark.slow
@needs_compiler
def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    from momos_hf.kernels import cpu

    monkeypatch.setenv("MOMOS_HF_KERNEL_CACHE", str(tmp_path))
    cached = cpu.build(os.environ.get("CXX", "c++"))
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated: loading it as it is would crash the process
    cpu.library.cache_clear()
    try:
        x, motifs, mosaic, scale = mosaic_case(16, 5, 37, 24, 3)
        reference = x.double() @ reconstruct(motifs.double(), mosaic, 37, scale.double()).T
        assert relative_error(PRODUCTS["compiled_lookup"](x, motifs, mosaic, scale, 37), reference) < 1e-5
        assert cached.stat().st_size > 1000
    finally:
        cpu.library.cache_clear()


def fake_compiler(folder, build_step):
    """A `$CXX` that answers `--version` at once and runs the shell line `build_step` for a build (its last
    argument, the output, is `$out`); it writes its pid to `pid`."""
    script = folder / "fake-c++"
    script.write_text(
        '#!/bin/sh\necho $$ >> "$(dirname "$0")/pid"\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
        f"for out; do :; done\n{build_step}\n"
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("hangs_on", ["--version", "build"])
def test_a_compiler_that_never_returns_gives_the_torch_lookup_after_the_timeout(
    tmp_path, monkeypatch, caplog, hangs_on
):
    from momos_hf.kernels import cpu

    compiler = fake_compiler(tmp_path, "sleep 60")
    if hangs_on == "--version":
        Path(compiler).write_text('#!/bin/sh\necho $$ >> "$(dirname "$0")/pid"\nsleep 60\n')
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("MOMOS_HF_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "BUILD_TIMEOUT_S", 0.5)
    cpu.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            momos = MoMosLinear(37, 24, torch.nn.Parameter(torch.randn(16, 5)), mosaic_case(16, 5, 37, 24, 1)[2])
            x = torch.randn(1, 37)
            with torch.no_grad():
                torch.testing.assert_close(momos(x), x @ momos.mosaic_weight().T)  # the torch-op lookup
                momos(x)
    finally:
        cpu.library.cache_clear()
    assert caplog.text.count("compiled CPU lookup is unavailable") == 1
    assert "did not finish within 0.5 s" in caplog.text
    pid = int((tmp_path / "pid").read_text().split()[-1])
    assert not cpu.process_alive(pid)  # the hung compiler was killed, not left running
    assert not any((tmp_path / "cache").glob(".build-*"))


def test_the_kernel_cache_is_an_absolute_folder(tmp_path, monkeypatch):
    """A relative or empty `$MOMOS_HF_KERNEL_CACHE`: ctypes would look a bare name up on the system path."""
    from momos_hf.kernels import cpu

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for value, expected in [
        (".", tmp_path),
        ("sub/../here", tmp_path / "here"),
        ("", tmp_path / "xdg/momos_hf/kernels"),
    ]:
        monkeypatch.setenv("MOMOS_HF_KERNEL_CACHE", value)
        assert cpu.cache_dir() == expected.resolve() and cpu.cache_dir().is_absolute()
    monkeypatch.setenv("MOMOS_HF_KERNEL_CACHE", ".")
    library = cpu.build(fake_compiler(tmp_path, 'echo library > "$out"'))
    assert library.parent == tmp_path.resolve() and library.read_text() == "library\n"


@needs_compiler
def test_a_cached_library_without_the_functions_gives_the_torch_lookup(tmp_path, monkeypatch, caplog):
    """Right name and sha256 record, other contents (someone else's library): one warning, no AttributeError."""
    import subprocess

    from momos_hf.kernels import cpu

    compiler = os.environ.get("CXX", "c++")
    monkeypatch.setenv("MOMOS_HF_KERNEL_CACHE", str(tmp_path))
    path = cpu.library_path(compiler)
    source = tmp_path / "other.cpp"
    source.write_text('extern "C" int other() { return 0; }\n')
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    path.with_suffix(".sha256").write_text(cpu.sha256_of(path))
    cpu.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert cpu.library() is None and cpu.library() is None
            assert select_product(torch.empty(1, 37), torch.empty(16, 8), None, 24) == "lookup"
    finally:
        cpu.library.cache_clear()
    assert caplog.text.count("lacks its functions") == 1
    assert not path.with_suffix(".sha256").exists()  # the next process builds it again


def test_a_build_removes_the_scratch_of_builders_that_were_killed(tmp_path, monkeypatch):
    import socket
    import subprocess

    from momos_hf.kernels import cpu

    monkeypatch.setenv("MOMOS_HF_KERNEL_CACHE", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    stale = tmp_path / f".build-{host}-{gone.pid}-x1"
    kept = [tmp_path / f".build-{host}-{os.getpid()}-x2", tmp_path / f".build-elsewhere-{gone.pid}-x3"]
    for scratch in [stale, *kept]:
        scratch.mkdir()
        (scratch / "momos_lookup.so").write_text("half")
    user = tmp_path / "build-notes"
    user.mkdir()
    cpu.build(fake_compiler(tmp_path, 'echo library > "$out"'))
    assert not stale.exists() and all(scratch.exists() for scratch in kept) and user.exists()


triton_missing = importlib.util.find_spec("triton") is None
needs_triton = pytest.mark.skipif(triton_missing, reason="triton has no wheel for this platform")
TRITON = ["triton_lookup", "triton_matmul"]


# every case in float32; the uint8-mosaic cases in 16-bit too (k only changes the index dtype)
DTYPE_CASES = [(torch.float32, case) for case in CASES] + [
    (dtype, case) for case in CASES if case[0] <= 256 for dtype in (torch.float16, torch.bfloat16)
]


@needs_triton
@pytest.mark.parametrize("dtype, case", DTYPE_CASES)
@pytest.mark.parametrize("name", TRITON)
def test_triton_kernels_forward_and_backward(name, dtype, case):
    x, motifs, mosaic, scale = mosaic_case(*case, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, motifs, scale)]
    y = PRODUCTS[name](leaves[0], leaves[1], mosaic, leaves[2], case[2])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)
    references = [t.double().requires_grad_() for t in (x, motifs, scale)]
    expected = references[0] @ reconstruct(references[1], mosaic, case[2], references[2]).T
    expected.backward(dy.double())
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert y.dtype == dtype and relative_error(y, expected) < tolerance
    for leaf, reference in zip(leaves, references):
        assert leaf.grad.dtype == dtype and relative_error(leaf.grad, reference.grad) < tolerance


@needs_triton
@pytest.mark.parametrize("name", TRITON)
def test_triton_kernels_without_scale_and_with_a_shared_dictionary(name):
    """Two layers reading one motif parameter: its gradient is the sum of both layers' (as with reconstruction)."""
    _, motifs, mosaic_a, _ = mosaic_case(16, 8, 37, 24, 4, seed=2)
    _, _, mosaic_b, _ = mosaic_case(16, 8, 37, 24, 4, seed=3)
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(4))
    grads = []
    for product in (name, "reconstruct"):
        shared = torch.nn.Parameter(motifs.clone())
        layers = [MoMosLinear(37, 24, shared, m) for m in (mosaic_a, mosaic_b)]
        for layer in layers:
            layer.product = product
        (layers[0](x).square().sum() + layers[1](x).sum()).backward()
        grads.append(shared.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@needs_triton
def test_a_model_runs_and_trains_on_the_triton_kernels():
    from conftest import build, model_inputs

    from momos_hf import MoMosConfig, get_momos_model

    mm = get_momos_model(build("gpt2"), MoMosConfig(k=16, s=4, scale=True))
    inputs = model_inputs("gpt2", batch=2, length=8)
    results = []
    for product in ("triton_matmul", "reconstruct"):
        mm.set_product(product)
        mm.zero_grad()
        out = mm(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        layer = next(iter(mm.momos_layers().values()))
        results.append((out.logits.detach(), layer.motifs.grad.clone(), layer.scale.grad.clone()))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("name", TRITON)
def test_triton_backward_with_a_frozen_base(name):
    """Only the input needs a gradient (a frozen base under an adapter): the motif-gradient kernel is skipped."""
    x, motifs, mosaic, scale = mosaic_case(256, 8, 37, 24, 3)
    x.requires_grad_()
    PRODUCTS[name](x, motifs, mosaic, scale, 37).sum().backward()
    expected = torch.ones(3, 24, dtype=torch.float64) @ reconstruct(motifs.double(), mosaic, 37, scale.double())
    assert motifs.grad is None and scale.grad is None and relative_error(x.grad, expected) < 1e-5
