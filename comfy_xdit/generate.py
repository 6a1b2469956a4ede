"""``comfy-xdit generate``: one parallel generation from a real checkpoint, written as a ComfyUI latent.

Text encoding stays outside the engine (in ComfyUI it is the stock encoder nodes' job), so the
prompt arrives as a conditioning file: safetensors with ``context`` [1, T, 4096] and ``pooled``
[1, 768], optionally ``negative_context`` and ``negative_pooled`` for cfg > 1.
The output loads in ComfyUI with the stock LoadLatent node and decodes with the stock VAEDecode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .caching.settings import settings_from_choice
from .config import ParallelConfig
from .requests import FluxConditioning, ModelSpec, SampleRequest


def read_conditioning(path: str | None, random_seed: int | None, guidance: float, model_path: str):
    if path is None:
        if random_seed is None:
            raise SystemExit("comfy-xdit generate: give --conditioning FILE.safetensors (context, pooled) or --random-conditioning")
        from .loading import read_flux_config

        config = read_flux_config(model_path)
        g = torch.Generator().manual_seed(random_seed)
        make = lambda: FluxConditioning(  # noqa: E731
            torch.randn(1, 256, config["joint_attention_dim"], generator=g),
            torch.randn(1, config["pooled_projection_dim"], generator=g),
            guidance,
        )
        return make(), make()
    from safetensors.torch import load_file

    tensors = load_file(path)
    missing = {"context", "pooled"} - tensors.keys()
    if missing:
        raise SystemExit(f"comfy-xdit generate: {path} lacks {sorted(missing)}; it needs context [1, T, 4096] and pooled [1, 768]")
    positive = FluxConditioning(tensors["context"], tensors["pooled"], guidance)
    negative = None
    if "negative_context" in tensors and "negative_pooled" in tensors:
        negative = FluxConditioning(tensors["negative_context"], tensors["negative_pooled"], guidance)
    return positive, negative


def run_generate(args: argparse.Namespace, config: ParallelConfig) -> int:
    from safetensors.torch import save_file

    from .preview import save_latent_preview

    if args.height % 16 or args.width % 16:
        print(f"note: {args.width}x{args.height} is padded to Flux's 16-pixel patch grid and cropped back", file=sys.stderr)
    positive, negative = read_conditioning(
        args.conditioning, args.seed if args.random_conditioning else None, args.guidance, args.model
    )
    latent = torch.zeros(args.batch_size, 16, args.height // 8, args.width // 8)
    request = SampleRequest(
        latent, positive, negative, seed=args.seed, steps=args.steps, cfg=args.cfg,
        sampler_name=args.sampler, scheduler=args.scheduler,
        cache=settings_from_choice(args.cache, args.cache_threshold, fastattn_window=args.fastattn_window),
    )
    from .cli import backend_from_flags

    with backend_from_flags(args).create(config) as pool:
        started = time.perf_counter()
        pool.load(ModelSpec(str(Path(args.model).resolve()), dtype=args.dtype, compile=args.compile,
                                 cuda_graphs=args.cuda_graphs))
        print(f"loaded {args.model} on {config.world_size} worker(s) in {time.perf_counter() - started:.1f} s ({config.describe_degrees()})")
        started = time.perf_counter()
        result = pool.sample(request, on_step=lambda step, total, _: print(f"\rstep {step}/{total}", end="", flush=True))
        print(f"\nsampled in {time.perf_counter() - started:.2f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": result.contiguous(), "latent_format_version_0": torch.tensor([])}, str(args.output))
    preview = save_latent_preview(result[0], args.output.with_suffix(".png"))
    print(f"latent: {args.output} (ComfyUI LoadLatent -> VAEDecode)\npreview: {preview}")
    return 0
