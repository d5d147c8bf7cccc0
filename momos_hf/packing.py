"""Bit-packing of mosaics: `n` indices of `b = ceil(log2 k)` bits each stored in `ceil(n * b / 8)` bytes.

Bits are laid out little-endian: index `i` occupies bits `i*b .. i*b + b-1` of the stream, least
significant bit first, and byte `j` holds stream bits `8j .. 8j+7` (bit 0 = least significant).
With `b = 8` this is one byte per index, with `b = 16` two little-endian bytes.
"""

from __future__ import annotations

import torch

CHUNK_INDICES = 2**20  # bounds the `n x b` bit matrix of one step (multiple of 8: chunks end on byte edges)


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` indices of `bits` bits occupy."""
    return -(-count * bits // 8)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Flattened integer `indices` (each `< 2**bits`) -> `uint8[packed_size(n, bits)]`."""
    flat = indices.flatten().long().cpu()
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if len(flat) and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"indices must lie in [0, {2**bits}) to pack into {bits} bits")
    if bits % 8 == 0:  # whole bytes (k = 256, 65536): little-endian bytes, no bit matrix needed
        return ((flat[:, None] >> (8 * torch.arange(bits // 8))) & 255).to(torch.uint8).flatten()
    shifts = torch.arange(bits)
    weights = 2 ** torch.arange(8)
    out = torch.empty(packed_size(len(flat), bits), dtype=torch.uint8)
    step = CHUNK_INDICES  # each chunk covers step * bits bits = a whole number of bytes
    for start in range(0, len(flat), step):
        stream = ((flat[start : start + step, None] >> shifts) & 1).flatten()
        stream = torch.nn.functional.pad(stream, (0, -len(stream) % 8))
        first = start * bits // 8
        out[first : first + len(stream) // 8] = (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)
    return out


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_indices`: `uint8[...]` -> `int64[count]`."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"a packed mosaic is a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if len(packed) != packed_size(count, bits):
        raise ValueError(
            f"packed mosaic has {len(packed)} bytes; {count} indices of {bits} bits need {packed_size(count, bits)}"
        )
    if bits == 0:
        return torch.zeros(count, dtype=torch.long)
    data = packed.cpu().long()
    if bits % 8 == 0:
        return (data.reshape(count, bits // 8) << (8 * torch.arange(bits // 8))).sum(1)
    shifts = torch.arange(8)
    weights = 2 ** torch.arange(bits)
    out = torch.empty(count, dtype=torch.long)
    step = CHUNK_INDICES
    for start in range(0, count, step):
        n = min(step, count - start)
        first = start * bits // 8
        stream = ((data[first : first + packed_size(n, bits), None] >> shifts) & 1).flatten()[: n * bits]
        out[start : start + n] = (stream.reshape(n, bits) * weights).sum(1)
    return out
