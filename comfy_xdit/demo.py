"""``comfy-xdit demo``: the engine end to end on an embedded default, no GPU or download needed.

It writes a small random Flux checkpoint (the real architecture, fewer and narrower blocks),
samples it on one worker and on N workers through the persistent pool, and prints both timings
and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from .config import ParallelConfig
from .requests import FluxConditioning, ModelSpec, SampleRequest

# Flux's architecture at a size a laptop CPU samples in seconds.
DEMO_MODEL = dict(
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    in_channels=64,
    guidance_embeds=True,
    axes_dims_rope=(8, 28, 28),
)
DEMO_TEXT_TOKENS = 64


def write_demo_checkpoint(path: Path) -> Path:
    """A seeded random Flux transformer as one safetensors file (diffusers key layout)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    if path.exists():
        return path
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**DEMO_MODEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def demo_request(size: int, steps: int, seed: int) -> SampleRequest:
    g = torch.Generator().manual_seed(seed)
    positive = FluxConditioning(
        torch.randn(1, DEMO_TEXT_TOKENS, DEMO_MODEL["joint_attention_dim"], generator=g),
        torch.randn(1, DEMO_MODEL["pooled_projection_dim"], generator=g),
        3.5,
    )
    latent = torch.zeros(1, 16, size // 8, size // 8)
    return SampleRequest(latent, positive, None, seed=seed, steps=steps, cfg=1.0)


def _sample_on_pool(config: ParallelConfig, spec: ModelSpec, request: SampleRequest, label: str) -> tuple[torch.Tensor, float, float]:
    from .pool import WorkerPool

    with WorkerPool(config) as pool:
        started = time.perf_counter()
        pool.load(spec)
        load_seconds = time.perf_counter() - started

        # One short warm-up job: the pool is persistent, so what users wait for is a warm job.
        pool.sample(dataclasses.replace(request, steps=1))

        def progress(step: int, total: int, _preview) -> None:
            print(f"\r  {label}: step {step}/{total}", end="", flush=True)

        started = time.perf_counter()
        latent = pool.sample(request, on_step=progress)
        seconds = time.perf_counter() - started
        print()
    return latent, seconds, load_seconds


def run_demo(args: argparse.Namespace, config: ParallelConfig) -> int:
    from safetensors.torch import save_file

    from .preview import save_latent_preview

    out: Path = args.out
    checkpoint = write_demo_checkpoint(out / "demo_flux_transformer.safetensors")
    spec = ModelSpec(str(checkpoint.resolve()), dtype="float32")
    request = demo_request(args.size, args.steps, args.seed)
    single = ParallelConfig(devices=config.devices[:1], attention_backend=config.attention_backend)

    print(f"comfy-xdit demo: random Flux ({DEMO_MODEL['num_layers']}+{DEMO_MODEL['num_single_layers']} blocks), "
          f"{args.size}x{args.size}, {args.steps} steps, float32, devices {', '.join(config.devices)}")
    reference, one_seconds, _ = _sample_on_pool(single, spec, request, "1 worker")
    result, n_seconds, _ = _sample_on_pool(config, spec, request, f"{config.world_size} workers")

    difference = float((result - reference).abs().max())
    relative = difference / float(reference.abs().max())
    save_file({"latent_tensor": result.contiguous(), "latent_format_version_0": torch.tensor([])}, str(out / "demo.latent"))
    preview = save_latent_preview(result[0], out / "demo_preview.png")

    print(f"1 worker:  {one_seconds:.2f} s (warm pool, sampling only)")
    print(f"{config.world_size} workers ({config.describe_degrees()}): {n_seconds:.2f} s "
          f"(speedup {one_seconds / n_seconds:.2f}x)")
    print(f"max difference: {difference:.3e} (relative {relative:.3e})")
    print(f"latent (ComfyUI LoadLatent format): {out / 'demo.latent'}")
    print(f"latent preview: {preview}")
    return 0 if relative < 1e-4 else 1
