"""Weight layout of the fused Triton kernel (pure torch, so it is testable anywhere)."""

from __future__ import annotations

import torch

BLOCK_K = 128  # codes per K block of the fused kernel


def repack_split(packed: torch.Tensor) -> torch.Tensor:
    """Standard packing (code 2i low nibble, 2i+1 high) uint8 [N, K/2] -> the kernel's layout:
    within each block of BLOCK_K codes, byte j holds code j (low nibble) and code j + BLOCK_K/2
    (high nibble), so each nibble half decodes to a contiguous K range with no interleave."""
    n, half = packed.shape
    if (2 * half) % BLOCK_K:
        raise ValueError(f"K={2 * half} is not a multiple of {BLOCK_K}")
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(n, -1, 2, BLOCK_K // 2)
    return (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(n, half).contiguous()


def unsplit(split: torch.Tensor) -> torch.Tensor:
    """The inverse of ``repack_split``: back to the standard packing."""
    n, half = split.shape
    lo = (split & 0xF).reshape(n, -1, BLOCK_K // 2)
    hi = (split >> 4).reshape(n, -1, BLOCK_K // 2)
    codes = torch.cat((lo, hi), dim=-1).reshape(n, half, 2)
    return (codes[..., 0] | (codes[..., 1] << 4)).contiguous()
