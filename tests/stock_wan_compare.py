#!/usr/bin/env python
"""One worker of comfy_xdit against stock ComfyUI's KSampler on a Wan 2.1 text-to-video file (a few cases).

Like tests/stock_sd3_compare.py, in its own process because it imports ComfyUI's top-level
modules. ComfyUI's Wan pins the head width to 128 (heads = width / 128), the text width to 4096
and the timestep frequencies to 256, so the file both sides load has width 256 (2 heads), one
block and a small feed-forward; the latent is a few frames of a small video.

The file is written in the original Wan layout under ComfyUI's ``model.diffusion_model.`` prefix in
models/diffusion_models and loaded by both sides from the same path, float32: stock UNETLoader
against our RankEngine on one CPU worker; each case runs ``nodes.common_ksampler`` (what KSampler
calls) and our sampler with the same seed, conditioning and latent, and the JSON result holds each
case's relative error.

    python tests/stock_wan_compare.py --workdir /tmp/wanc --out /tmp/wanc/result.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stock_family_compare import one_cpu_worker, parse_args, record_case, run, start_comfyui, write_result  # noqa: E402

TEXT_TOKENS = 24
ARCHITECTURE = dict(num_layers=1, heads=2, head_dim=128, ffn_dim=64, text_dim=4096, freq_dim=256)
CASES = [
    # ComfyUI's Wan example uses uni_pc / simple at cfg 6; uni_pc is not offered yet, so heun at that cfg.
    dict(sampler="heun", scheduler="simple", steps=3, cfg=6.0, batch=1, denoise=1.0, latent="empty", shape=(3, 6, 10)),
    dict(sampler="euler", scheduler="normal", steps=3, cfg=1.0, batch=2, denoise=1.0, latent="empty", shape=(2, 6, 8),
         negative_tokens=TEXT_TOKENS // 2),
    # denoise < 1 from a given video latent goes through the per-channel latent format both ways.
    dict(sampler="dpmpp_2m", scheduler="sgm_uniform", steps=3, cfg=5.0, batch=1, denoise=0.6, latent="video", shape=(2, 6, 8)),
    # Odd frames/rows/columns: both pad to the 1x2x2 patch (circular) and crop back; ancestral extra noise.
    dict(sampler="euler_ancestral", scheduler="simple", steps=3, cfg=5.0, batch=1, denoise=1.0, latent="empty", shape=(3, 5, 7)),
    # A stock EmptyLatentImage (4 channels, 4-D): widened to 16 channels and one frame by both.
    dict(sampler="euler", scheduler="simple", steps=2, cfg=1.0, batch=1, denoise=1.0, latent="image4", shape=(1, 6, 8)),
]


def conditioning(seed: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, tokens, 4096), generator=g)


def make_latent(case: dict, seed: int):
    import torch

    b, (t, h, w) = case["batch"], case["shape"]
    if case["latent"] == "image4":
        return torch.zeros((b, 4, h, w))
    if case["latent"] == "empty":
        return torch.zeros((b, 16, t, h, w))  # EmptyHunyuanLatentVideo / Wan's empty latent
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 16, t, h, w), generator=g) * 1.5 + 0.1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    nodes, folder_paths, comfy = start_comfyui(args)

    from checkpoints import COMFY_PREFIX, make_wan_diffusers_model, write_wan_file
    from comfy_xdit.requests import SampleRequest, WanConditioning

    unet_dir = args.workdir.resolve() / "diffusion_models"
    path = write_wan_file(make_wan_diffusers_model(**ARCHITECTURE, seed=0), unet_dir / "wan2.1_t2v_tiny.safetensors",
                          prefix=COMFY_PREFIX)
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
    engine = one_cpu_worker(path, "wan")

    positive = conditioning(1, TEXT_TOKENS)
    results = []
    for index, case in enumerate(CASES):
        case = dict(case, seed=3000 + index)
        case["name"] = "{sampler}/{scheduler} cfg {cfg} batch {batch} denoise {denoise} {latent} {shape}".format(**case)
        negative = conditioning(2, case.get("negative_tokens", TEXT_TOKENS))
        latent = make_latent(case, case["seed"] + 7)

        def compare():
            stock = nodes.common_ksampler(
                stock_model, case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"],
                [[positive.clone(), {"pooled_output": None}]], [[negative.clone(), {"pooled_output": None}]],
                {"samples": latent.clone()}, denoise=case["denoise"])[0]["samples"]
            ours = engine.sample(SampleRequest(
                latent=latent.clone(), positive=WanConditioning(positive.clone()), negative=WanConditioning(negative.clone()),
                seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"],
                scheduler=case["scheduler"], denoise=case["denoise"]))
            return ours, stock

        results.append(record_case(case, compare))

    return write_result(args, stock_info, results, started)


if __name__ == "__main__":
    run(main)
