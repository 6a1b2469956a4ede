#!/usr/bin/env python
"""One worker of comfy_xdit against stock ComfyUI's KSampler on a Qwen-Image file (a few cases).

Like tests/stock_wan_compare.py, in its own process because it imports ComfyUI's top-level
modules. ComfyUI's Qwen-Image reads only the input channels and the number of blocks from a file:
24 heads of 128, text width 3584 and the 4x feed-forward are fixed, so the file both sides load is
full width with one block (about 1.4 GB in float32); the latents are small (a few hundred pixels).

The file is written with ComfyUI's ``model.diffusion_model.`` prefix in models/diffusion_models
and loaded by both sides from the same path, float32: stock UNETLoader against our RankEngine on
one CPU worker; each case runs ``nodes.common_ksampler`` (what KSampler calls) and our sampler with
the same seed, conditioning and latent, and the JSON result holds each case's relative error.

    python tests/stock_qwen_image_compare.py --workdir /tmp/qwc --out /tmp/qwc/result.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stock_family_compare import one_cpu_worker, parse_args, record_case, run, start_comfyui, write_result  # noqa: E402

TEXT_TOKENS = 16
TEXT_WIDTH = 3584
ARCHITECTURE = dict(num_layers=1, heads=24, head_dim=128, joint_attention_dim=TEXT_WIDTH)
CASES = [
    # ComfyUI's Qwen-Image example: euler / simple at cfg 2.5 (here from an EmptySD3LatentImage, 4-D).
    dict(sampler="euler", scheduler="simple", steps=3, cfg=2.5, batch=1, denoise=1.0, latent="empty", shape=(8, 8)),
    # Batch 2 without CFG, a second-order sampler. (Not heun with "normal": that schedule's last sigma
    # before 0 is ModelSamplingFlux's sigma_min, about 1e-3, where heun's (x - denoised) / sigma
    # cancels and amplifies float32 rounding of either side about a hundredfold: measured 1.8e-5.)
    dict(sampler="heun", scheduler="simple", steps=2, cfg=1.0, batch=2, denoise=1.0, latent="empty", shape=(6, 8)),
    dict(sampler="euler", scheduler="normal", steps=3, cfg=2.5, batch=1, denoise=1.0, latent="empty", shape=(6, 8)),
    # denoise < 1 from a given one-frame latent (5-D) goes through the per-channel latent format both ways;
    # the negative is shorter than the positive.
    dict(sampler="dpmpp_2m", scheduler="sgm_uniform", steps=3, cfg=4.0, batch=1, denoise=0.6, latent="image5",
         shape=(8, 6), negative_tokens=TEXT_TOKENS // 2),
    # Odd rows/columns: both pad to the 2x2 patch (circular) and crop back, and the token grid is odd
    # (3 x 4), where ComfyUI's rotary positions are not diffusers'; ancestral extra noise.
    dict(sampler="euler_ancestral", scheduler="simple", steps=3, cfg=3.0, batch=1, denoise=1.0, latent="empty", shape=(5, 7)),
]


def conditioning(seed: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, tokens, TEXT_WIDTH), generator=g)


def make_latent(case: dict, seed: int):
    import torch

    b, (h, w) = case["batch"], case["shape"]
    if case["latent"] == "empty":
        return torch.zeros((b, 16, h, w))  # EmptySD3LatentImage
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 16, 1, h, w), generator=g) * 1.5 + 0.1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    nodes, folder_paths, comfy = start_comfyui(args)
    import torch

    from checkpoints import COMFY_PREFIX, make_qwen_image_diffusers_model, write_qwen_image_file
    from comfy_xdit.requests import QwenImageConditioning, SampleRequest

    unet_dir = args.workdir.resolve() / "diffusion_models"
    model = make_qwen_image_diffusers_model(**ARCHITECTURE, seed=0)
    path = write_qwen_image_file(model, unet_dir / "qwen_image_tiny.safetensors", prefix=COMFY_PREFIX)
    del model
    folder_paths.add_model_folder_path("diffusion_models", str(unet_dir))
    stock_model = nodes.UNETLoader().load_unet(path.name, "default")[0]
    sampling = stock_model.get_model_object("model_sampling")
    stock_info = {
        "model_class": type(stock_model.model).__name__,
        "config_class": type(stock_model.model.model_config).__name__,
        "weight_dtype": str(next(stock_model.model.diffusion_model.parameters()).dtype),
        "manual_cast_dtype": str(stock_model.model.manual_cast_dtype),
        "sampling_class": type(sampling).__name__,
        "shift": float(sampling.shift), "timestep_of_sigma_half": float(sampling.timestep(torch.tensor(0.5))),
        "latent_format": type(stock_model.model.latent_format).__name__,
    }
    engine = one_cpu_worker(path, "qwen_image")

    positive = conditioning(1, TEXT_TOKENS)
    results = []
    for index, case in enumerate(CASES):
        case = dict(case, seed=4000 + index)
        case["name"] = "{sampler}/{scheduler} cfg {cfg} batch {batch} denoise {denoise} {latent} {shape}".format(**case)
        negative = conditioning(2, case.get("negative_tokens", TEXT_TOKENS))
        latent = make_latent(case, case["seed"] + 7)

        def compare():
            stock = nodes.common_ksampler(
                stock_model, case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"],
                [[positive.clone(), {"pooled_output": None}]], [[negative.clone(), {"pooled_output": None}]],
                {"samples": latent.clone()}, denoise=case["denoise"])[0]["samples"]
            ours = engine.sample(SampleRequest(
                latent=latent.clone(), positive=QwenImageConditioning(positive.clone()),
                negative=QwenImageConditioning(negative.clone()),
                seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"],
                scheduler=case["scheduler"], denoise=case["denoise"]))
            case["shapes"] = [list(ours.shape), list(stock.shape)]
            return ours, stock

        results.append(record_case(case, compare))

    path.unlink()  # 1.4 GB: do not leave it in pytest's kept temporary folders
    return write_result(args, stock_info, results, started)


if __name__ == "__main__":
    run(main)
