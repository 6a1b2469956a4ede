"""Time each attention kernel at the shapes a Flux-dev 1024x1024 forward gives one GPU.

Flux-dev attends over 4096 image + 512 text tokens with 24 heads of 128; Ulysses at degree N
leaves each GPU 24/N heads over the whole sequence. SDPA picks its backend itself; the explicit
rows call one backend's aten op, as comfy_xdit.attention.kernels does for an explicit
attention_backend. The fastest row is what `attention_backend="auto"` should pick.

    python bench/attention_kernels.py --json $OUT/attention.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _flash(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


def _cudnn(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


def _cudnn_lse(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[0]


def _efficient(q, k, v):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]


KERNELS = {"sdpa-default": _sdpa, "flash": _flash, "cudnn": _cudnn, "cudnn+lse": _cudnn_lse, "efficient": _efficient}


def time_kernel(fn, q, k, v, iters: int) -> float:
    for _ in range(3):
        fn(q, k, v)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(q, k, v)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", default="24,12,6", help="heads per GPU: 24 (1 GPU), 12 (ulysses=2), 6 (ulysses=4)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reference = None
    for heads in (int(h) for h in args.heads.split(",")):
        gen = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(1, heads, args.tokens, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        flops = 4 * heads * args.tokens * args.tokens * args.head_dim
        reference = _sdpa(q, k, v).float()
        for name, fn in KERNELS.items():
            try:
                ms = time_kernel(fn, q, k, v, args.iters)
                err = ((fn(q, k, v).float() - reference).norm() / reference.norm()).item()
            except RuntimeError as error:  # a backend that does not take these shapes
                print(f"heads={heads:3d} {name:13s} unavailable: {str(error).splitlines()[0]}")
                continue
            row = dict(heads=heads, tokens=args.tokens, kernel=name, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                       rel_err_vs_sdpa=err, device=torch.cuda.get_device_name(), torch=torch.__version__)
            print(f"heads={heads:3d} {name:13s} {ms:7.3f} ms {row['tflops']:6.1f} TFLOP/s  err {err:.1e}")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
