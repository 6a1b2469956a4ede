#!/usr/bin/env python
"""One worker of comfy_xdit against stock ComfyUI's KSampler on PixArt-alpha / Sigma files (a few cases).

Like tests/stock_sd3_compare.py, in its own process because it imports ComfyUI's top-level
modules. ComfyUI's PixArt pins the width (1152, 16 heads of 72) and the T5 width (4096); depth is
counted from the keys, so the files here are full width with one block (about 150 MB each in
float32, written at test time).

Two original-layout files, each loaded by both sides from the same path, float32:
- a PixArt-Sigma-style transformer (no micro-conditions) in models/diffusion_models, no prefix:
  stock UNETLoader;
- a PixArt-alpha-style one (resolution / aspect-ratio micro-conditions) under ComfyUI's
  ``model.diffusion_model.`` prefix in models/checkpoints: stock ``load_checkpoint_guess_config``.

Each case: our RankEngine on one CPU worker vs ``nodes.common_ksampler`` (what KSampler calls),
same seed, conditioning and latent; the JSON result holds each case's relative error.

    python tests/stock_pixart_compare.py --workdir /tmp/pxc --out /tmp/pxc/result.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stock_family_compare import one_cpu_worker, parse_args, record_case, run, start_comfyui, write_result  # noqa: E402

TEXT_TOKENS = 24
LATENT_HW = (40, 36)  # 20 x 18 image tokens: not square; ComfyUI's PixArt needs (h + w) / 2 > 32
CASES = [
    dict(file="unet", sampler="euler", scheduler="normal", steps=3, cfg=1.0, batch=1, denoise=1.0, latent="empty"),
    dict(file="unet", sampler="dpmpp_2m", scheduler="karras", steps=3, cfg=4.5, batch=2, denoise=1.0, latent="empty",
         negative_tokens=TEXT_TOKENS // 2),
    dict(file="unet", sampler="euler_ancestral", scheduler="simple", steps=3, cfg=4.5, batch=1, denoise=0.6, latent="image"),
    dict(file="checkpoint", sampler="heun", scheduler="sgm_uniform", steps=2, cfg=4.5, batch=1, denoise=1.0, latent="empty"),
    dict(file="checkpoint", sampler="euler", scheduler="beta", steps=3, cfg=3.0, batch=1, denoise=0.6, latent="image"),
    # CLIPTextEncodePixArtAlpha's width / height micro-condition on both prompts.
    dict(file="checkpoint", sampler="dpmpp_2m", scheduler="normal", steps=3, cfg=4.5, batch=1, denoise=1.0, latent="empty",
         size=(768, 1024)),
]


def conditioning(seed: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, tokens, 4096), generator=g)


def make_latent(case: dict, seed: int):
    import torch

    b, (h, w) = case["batch"], LATENT_HW
    if case["latent"] == "empty":
        return torch.zeros((b, 4, h, w))  # stock EmptyLatentImage
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 4, h, w), generator=g) * 4.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    nodes, folder_paths, comfy = start_comfyui(args)
    import comfy.sd

    from comfy_xdit.requests import PixArtConditioning, SampleRequest
    from pixart_files import COMFY_PREFIX, make_pixart_diffusers_model, write_original_pixart_file

    workdir = args.workdir.resolve()
    unet_dir, checkpoint_dir = workdir / "diffusion_models", workdir / "checkpoints"
    full_width = dict(num_layers=1, heads=16, head_dim=72, caption_channels=4096)
    files = {
        "unet": write_original_pixart_file(make_pixart_diffusers_model(**full_width, alpha=False, seed=0),
                                           unet_dir / "pixart_sigma_tiny.safetensors"),
        "checkpoint": write_original_pixart_file(make_pixart_diffusers_model(**full_width, alpha=True, seed=1),
                                                 checkpoint_dir / "pixart_alpha_tiny.safetensors", prefix=COMFY_PREFIX),
    }
    folder_paths.add_model_folder_path("diffusion_models", str(unet_dir))
    stock_models = {
        "unet": nodes.UNETLoader().load_unet(files["unet"].name, "default")[0],
        "checkpoint": comfy.sd.load_checkpoint_guess_config(str(files["checkpoint"]), output_vae=False, output_clip=False)[0],
    }
    stock_info = {}
    for name, model in stock_models.items():
        sampling = model.get_model_object("model_sampling")
        stock_info[name] = {
            "model_class": type(model.model).__name__,
            "model_sampling": [c.__name__ for c in type(sampling).__mro__],
            "weight_dtype": str(next(model.model.diffusion_model.parameters()).dtype),
            "manual_cast_dtype": str(model.model.manual_cast_dtype),
            "latent_format": type(model.model.latent_format).__name__,
            "micro_conditioning": bool(model.model.diffusion_model.micro_conditioning),
        }
    engines = {name: one_cpu_worker(path, "pixart") for name, path in files.items()}

    positive_context = conditioning(1, TEXT_TOKENS)
    results = []
    for index, case in enumerate(CASES):
        case = dict(case, seed=3000 + index)
        case["name"] = "{file}: {sampler}/{scheduler} cfg {cfg} batch {batch} denoise {denoise} {latent}".format(**case)
        negative_context = conditioning(2, case.get("negative_tokens", TEXT_TOKENS))
        extras, size = {}, None
        if "size" in case:
            (height, width) = case["size"]
            extras, size = {"width": width, "height": height}, (float(height), float(width))
            case["name"] += f" size {height}x{width}"
        latent = make_latent(case, case["seed"] + 7)

        def compare():
            stock = nodes.common_ksampler(
                stock_models[case["file"]], case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"],
                [[positive_context.clone(), dict(extras)]], [[negative_context.clone(), dict(extras)]],
                {"samples": latent.clone()}, denoise=case["denoise"])[0]["samples"]
            ours = engines[case["file"]].sample(SampleRequest(
                latent=latent.clone(),
                positive=PixArtConditioning(positive_context.clone(), size),
                negative=PixArtConditioning(negative_context.clone(), size),
                seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"],
                scheduler=case["scheduler"], denoise=case["denoise"]))
            return ours, stock

        results.append(record_case(case, compare))

    return write_result(args, stock_info, results, started)


if __name__ == "__main__":
    run(main)
