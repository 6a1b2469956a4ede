#!/usr/bin/env python
"""One worker of comfy_xdit against stock ComfyUI's KSampler on a HunyuanVideo 1.0 text-to-video file (a few cases).

Like tests/stock_wan_compare.py, in its own process because it imports ComfyUI's top-level
modules. ComfyUI's HunyuanVideo pins the head width to 128 (heads = width / 128), the rotary axes
to (16, 56, 56), the MLP ratio to 4, the token refiner to 2 blocks and the pooled (CLIP-L) width to
768, so the file both sides load has width 256 (2 heads), one dual-stream and one single-stream
block; the text width is read from the file (64 here, 4096 in the release); the latent is a few
frames of a small video.

The file is written in the original HunyuanVideo layout under ComfyUI's ``model.diffusion_model.``
prefix in models/diffusion_models and loaded by both sides from the same path, float32: stock
UNETLoader against our RankEngine on one CPU worker; each case runs ``nodes.common_ksampler`` (what
KSampler calls) and our sampler with the same seed, conditioning and latent, and the JSON result
holds each case's relative error.

A negative of another text length than the positive is used at cfg > 1 (the ancestral case).

    python tests/stock_hunyuan_video_compare.py --workdir /tmp/hvc --out /tmp/hvc/result.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stock_family_compare import one_cpu_worker, parse_args, record_case, run, start_comfyui, write_result  # noqa: E402

TEXT_TOKENS = 24
TEXT_DIM = 64
ARCHITECTURE = dict(num_layers=1, num_single_layers=1, num_refiner_layers=2, heads=2, head_dim=128,
                    rope_axes_dim=(16, 56, 56), text_dim=TEXT_DIM, pooled_dim=768, mlp_ratio=4.0, guidance=True)
CASES = [
    # ComfyUI's HunyuanVideo example: euler / simple, cfg 1, FluxGuidance 6 (here 6.0 by ComfyUI's default: no key).
    dict(sampler="euler", scheduler="simple", steps=3, cfg=1.0, guidance=None, batch=1, denoise=1.0, latent="empty",
         shape=(3, 6, 10), negative_tokens=TEXT_TOKENS // 2),
    dict(sampler="heun", scheduler="normal", steps=2, cfg=1.0, guidance=3.5, batch=2, denoise=1.0, latent="empty",
         shape=(2, 6, 8)),
    # denoise < 1 from a given video latent goes through the latent format both ways; real cfg on top of guidance.
    dict(sampler="dpmpp_2m", scheduler="sgm_uniform", steps=3, cfg=4.0, guidance=6.0, batch=1, denoise=0.6, latent="video",
         shape=(2, 6, 8)),
    # Ancestral extra noise of a 5-D latent.
    dict(sampler="euler_ancestral", scheduler="simple", steps=3, cfg=2.0, guidance=7.0, batch=1, denoise=1.0, latent="empty",
         shape=(3, 4, 6), negative_tokens=TEXT_TOKENS // 2),
    # A stock EmptyLatentImage (4 channels, 4-D): widened to 16 channels and one frame by both.
    dict(sampler="euler", scheduler="simple", steps=2, cfg=1.0, guidance=6.0, batch=1, denoise=1.0, latent="image4",
         shape=(1, 6, 8)),
]


def conditioning(seed: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, tokens, TEXT_DIM), generator=g), torch.randn((1, 768), generator=g)


def stock_conditioning(tokens, pooled, guidance):
    extras = {"pooled_output": pooled.clone()}
    if guidance is not None:  # FluxGuidance; without it ComfyUI's HunyuanVideo uses 6.0
        extras["guidance"] = guidance
    return [[tokens.clone(), extras]]


def make_latent(case: dict, seed: int):
    import torch

    b, (t, h, w) = case["batch"], case["shape"]
    if case["latent"] == "image4":
        return torch.zeros((b, 4, h, w))
    if case["latent"] == "empty":
        return torch.zeros((b, 16, t, h, w))  # EmptyHunyuanLatentVideo
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 16, t, h, w), generator=g) * 1.5 + 0.1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    nodes, folder_paths, comfy = start_comfyui(args)

    from checkpoints import COMFY_PREFIX, make_hunyuan_video_diffusers_model, write_hunyuan_video_file
    from comfy_xdit.requests import HunyuanVideoConditioning, SampleRequest

    unet_dir = args.workdir.resolve() / "diffusion_models"
    path = write_hunyuan_video_file(make_hunyuan_video_diffusers_model(**ARCHITECTURE, seed=0),
                                    unet_dir / "hunyuan_video_t2v_tiny.safetensors", prefix=COMFY_PREFIX)
    folder_paths.add_model_folder_path("diffusion_models", str(unet_dir))
    stock_model = nodes.UNETLoader().load_unet(path.name, "default")[0]
    sampling = stock_model.get_model_object("model_sampling")
    stock_info = {
        "model_class": type(stock_model.model).__name__,
        "config_class": type(stock_model.model.model_config).__name__,
        "weight_dtype": str(next(stock_model.model.diffusion_model.parameters()).dtype),
        "manual_cast_dtype": str(stock_model.model.manual_cast_dtype),
        "shift": float(sampling.shift), "multiplier": float(sampling.multiplier),
        "latent_format": type(stock_model.model.latent_format).__name__,
        "num_heads": stock_model.model.diffusion_model.num_heads,
    }
    engine = one_cpu_worker(path, "hunyuan_video")

    positive, positive_pooled = conditioning(1, TEXT_TOKENS)
    results = []
    for index, case in enumerate(CASES):
        case = dict(case, seed=3000 + index)
        case["name"] = ("{sampler}/{scheduler} cfg {cfg} guidance {guidance} batch {batch} denoise {denoise} {latent} "
                        "{shape}").format(**case)
        negative, negative_pooled = conditioning(2, case.get("negative_tokens", TEXT_TOKENS))
        guidance = case["guidance"]
        ours_guidance = 6.0 if guidance is None else guidance  # what the bridge reads for a missing key
        latent = make_latent(case, case["seed"] + 7)

        def compare():
            stock = nodes.common_ksampler(
                stock_model, case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"],
                stock_conditioning(positive, positive_pooled, guidance), stock_conditioning(negative, negative_pooled, guidance),
                {"samples": latent.clone()}, denoise=case["denoise"])[0]["samples"]
            ours = engine.sample(SampleRequest(
                latent=latent.clone(),
                positive=HunyuanVideoConditioning(positive.clone(), positive_pooled.clone(), ours_guidance),
                negative=HunyuanVideoConditioning(negative.clone(), negative_pooled.clone(), ours_guidance),
                seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"],
                scheduler=case["scheduler"], denoise=case["denoise"]))
            return ours, stock

        results.append(record_case(case, compare))

    return write_result(args, stock_info, results, started)


if __name__ == "__main__":
    run(main)
