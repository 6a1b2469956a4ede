"""Attention kernels behind one call signature, each returning the log-sum-exp next to the output.

Ring attention merges partial results through the log-sum-exp, so a kernel that cannot return a
real one must never be used for it (yunchang's math and cuDNN paths return zeros there, which
silently corrupts ring results). Every kernel here returns the real value, or is not offered.

Layout everywhere: q, k, v are [batch, seq, heads, head_dim]; out the same as q; lse is
[batch, heads, seq_q] in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AttentionWithLse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Kernel:
    name: str
    fn: AttentionWithLse
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in tensors]


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _heads_first(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out.transpose(1, 2), lse.float()


def _cuda_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _heads_first(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out.transpose(1, 2), lse.float()


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _heads_first(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    return out.transpose(1, 2), lse.float().reshape(q.shape[0], q.shape[1], q.shape[2])


def _flash_attn_package(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    return out, lse.float()


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference kernel in plain float32 arithmetic; slow, runs anywhere, used by tests."""
    qh, kh, vh = (t.float() for t in _heads_first(q, k, v))
    scores = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vh
    return out.transpose(1, 2).to(q.dtype), lse


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)

KERNELS: dict[str, Kernel] = {
    "cpu_flash": Kernel("cpu_flash", _cpu_flash, ("cpu",), _FLOAT),
    "cudnn": Kernel("cudnn", _cudnn, ("cuda",), _HALF),
    "flash": Kernel("flash", _cuda_flash, ("cuda",), _HALF),
    "flash_attn": Kernel("flash_attn", _flash_attn_package, ("cuda",), _HALF),
    "math": Kernel("math", _math, ("cpu", "cuda"), _FLOAT),
}


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_lse_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel for attention that must return a log-sum-exp (ring), honouring the config's backend."""
    if backend in ("auto", "sdpa"):
        if device.type == "cpu" or dtype == torch.float32:
            name = "cpu_flash" if device.type == "cpu" else "math"
        else:
            # cuDNN is the fastest attention on Hopper at DiT shapes; it returns a real lse when asked.
            name = "flash_attn" if flash_attn_installed() else "cudnn"
    else:
        name = backend
    kernel = KERNELS[name]
    if device.type not in kernel.devices or dtype not in kernel.dtypes:
        raise ValueError(
            f"attention_backend {backend!r} ({name}) does not run on {device.type} in {dtype}; "
            f"choose 'auto' or one of {[k for k, v in KERNELS.items() if device.type in v.devices]}"
        )
    if name == "flash_attn" and not flash_attn_installed():
        raise ValueError("attention_backend 'flash_attn' needs the flash-attn package: pip install comfy-xdit[flash-attn]")
    return kernel


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention without lse (no ring): PyTorch's SDPA picks the best kernel itself."""
    q, k, v = _heads_first(q, k, v)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
