"""The lookup product compiled for the CPU (`lookup.cpp`, C++ with OpenMP), for inference on few rows.

Built at first use with the machine's C++ compiler (`$CXX`, else `c++`; about a second, each call killed after
`BUILD_TIMEOUT_S`) and kept in `$MOMOS_HF_KERNEL_CACHE` (default `~/.cache/momos_hf/kernels`) under a name that
hashes the source, the flags, the compiler's version and the CPU's features, so an edit, another compiler or
another machine builds anew. It is called through `ctypes` on the tensors' memory: no Python per block, no
int32 copy of the mosaic, no table padding, which is what made the torch-op lookup slower than a dense product
at small sizes. Where no compiler works (or the cached library lacks its functions), `library()` returns None
after one warning and the selector keeps the torch-op lookup.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).with_name("lookup.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
ENTRIES = {torch.uint8: "momos_lookup_u8", torch.uint16: "momos_lookup_u16", torch.int32: "momos_lookup_i32"}


BUILD_TIMEOUT_S = 300.0  # a compiler that hangs (or a `$CXX` that never returns) gives the torch-op lookup
SCRATCH_PREFIX = ".build-"  # scratch folders `.build-<host>-<pid>-*`: removed once their builder is gone


def cache_dir() -> Path:
    """The kernel cache as an absolute path: `$MOMOS_HF_KERNEL_CACHE` where set and not empty, else
    `~/.cache/momos_hf/kernels`. Absolute, because `ctypes` looks a bare file name up on the system's search
    path, never in the working directory."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "momos_hf" / "kernels"
    return Path(os.environ.get("MOMOS_HF_KERNEL_CACHE") or default).expanduser().resolve()


def cpu_features() -> str:
    """What `-march=native` compiles for: the CPU's feature flags (a library built elsewhere may not run here)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() + platform.machine()


def run_bounded(command: list[str], timeout: float) -> str:
    """`command`'s stdout; `subprocess.TimeoutExpired` after `timeout` seconds, with the command and every
    process it started killed (a compiler's children would otherwise hold its pipes open, and us waiting)."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, out, err)
    return out


def remove_stale_scratch(folder: Path) -> None:
    """Remove the scratch folders of this host's builders that are gone (killed mid-compile)."""
    mine = f"{SCRATCH_PREFIX}{socket.gethostname()}-"
    for scratch in folder.glob(f"{mine}*"):
        pid = scratch.name[len(mine) :].split("-")[0]
        if scratch.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def library_path(compiler: str, timeout: float = BUILD_TIMEOUT_S) -> Path:
    """Where the library built by `compiler` lives in the cache: its name hashes the source, the flags, the
    compiler's version and the CPU's features."""
    version = run_bounded([compiler, "--version"], timeout)
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *FLAGS, version, cpu_features()]).encode()).hexdigest()[:16]
    return cache_dir() / f"momos_lookup-{key}.so"


def build(compiler: str, timeout: float = BUILD_TIMEOUT_S) -> Path:
    """Compile `lookup.cpp` into the cache (once per source, flags, compiler and CPU) and return the library's
    absolute path. Each compiler call is killed after `timeout` seconds (`subprocess.TimeoutExpired`). A
    cached library is used only if its bytes match the sha256 recorded when it was built: loading a damaged
    one would crash the process, not raise; one that does not match is built again."""
    path = library_path(compiler, timeout)
    record = path.with_suffix(".sha256")
    if not (path.is_file() and record.is_file() and record.read_text() == sha256_of(path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(path.parent)
        prefix = f"{SCRATCH_PREFIX}{socket.gethostname()}-{os.getpid()}-"
        # whole files or none: concurrent builds race safely
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=prefix) as scratch:
            built = Path(scratch) / path.name
            run_bounded([compiler, *FLAGS, str(SOURCE), "-o", str(built)], timeout)
            (Path(scratch) / record.name).write_text(sha256_of(built))
            os.replace(built, path)
            os.replace(Path(scratch) / record.name, record)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def library() -> Optional[dict[torch.dtype, Callable]]:
    """The compiled lookup's function for each mosaic dtype, or None (with one warning) where it cannot be built
    or loaded here, or the cached library lacks them."""
    compiler = os.environ.get("CXX", "c++")
    try:
        path = build(compiler, BUILD_TIMEOUT_S)
        lib = ctypes.CDLL(str(path))
        functions = {dtype: getattr(lib, name) for dtype, name in ENTRIES.items()}
    except subprocess.TimeoutExpired as error:
        return unavailable(f"{compiler} did not finish within {error.timeout:g} s")
    except subprocess.CalledProcessError as error:
        return unavailable(f"{compiler}: {(error.stderr or str(error)).strip()[:300]}")
    except OSError as error:
        return unavailable(f"{compiler}: {error}")
    except AttributeError as error:  # a library of the right name and record but other contents
        path.with_suffix(".sha256").unlink(missing_ok=True)  # our record: the next process builds it again
        return unavailable(f"{path} lacks its functions ({error})")
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for function in functions.values():
        function.argtypes = [pointer, size, pointer, size, size, pointer, size, size, pointer, pointer, ctypes.c_int]
        function.restype = ctypes.c_int  # 1: its scratch memory could not be allocated
    return functions


def unavailable(reason: str) -> None:
    logger.warning(f"momos_hf: the compiled CPU lookup is unavailable ({reason}); using the torch-op lookup")


def compiled_lookup_product(
    x: torch.Tensor, motifs: torch.Tensor, mosaic: torch.Tensor, scale: Optional[torch.Tensor], in_features: int
) -> torch.Tensor:
    """`x @ W_hat^T` by the compiled lookup (float32 inside, the result in `x`'s dtype). Inference only.
    Decoding calls it once per layer and token, so it does little besides the call."""
    if torch.is_grad_enabled() and (
        x.requires_grad or motifs.requires_grad or (scale is not None and scale.requires_grad)
    ):
        raise RuntimeError("the compiled CPU lookup has no backward: use product 'lookup' or 'reconstruct' to train")
    if x.device.type != "cpu" or mosaic.dtype not in ENTRIES:
        raise ValueError(
            f"the compiled lookup runs on CPU tensors with a uint8/uint16/int32 mosaic, got {x.device} {mosaic.dtype}"
        )
    functions = library()
    if functions is None:
        raise RuntimeError("the compiled CPU lookup could not be built here (see the warning above)")
    k, s = motifs.shape
    out_features, nb = mosaic.shape
    rows = x.reshape(-1, x.shape[-1]).float()
    if nb * s != in_features:
        rows = F.pad(rows, (0, nb * s - in_features))  # the last block's padded weights meet zeros
    rows, motifs, mosaic = rows.contiguous(), motifs.float().contiguous(), mosaic.contiguous()
    scale = None if scale is None else scale.float().contiguous()
    y = torch.empty(rows.shape[0], out_features)
    failed = functions[mosaic.dtype](
        rows.data_ptr(),
        rows.shape[0],
        motifs.data_ptr(),
        k,
        s,
        mosaic.data_ptr(),
        out_features,
        nb,
        None if scale is None else scale.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError(f"the compiled lookup could not allocate its table ({nb} x {k} floats per 8 rows)")
    return y.to(x.dtype).view(*x.shape[:-1], out_features)
