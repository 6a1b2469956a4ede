#!/usr/bin/env python
"""One worker of comfy_xdit against stock ComfyUI's KSampler on SD3 / SD3.5 files (a few cases).

Like tests/stock_ksampler_compare.py (which covers every sampler x scheduler on Flux), in its own
process because it imports ComfyUI's top-level modules. ComfyUI's MMDiT pins the width to 64 per
block (heads = blocks = width / 64), so a file both sides load has 64-wide heads and as many
heads as blocks: 2 here (width 128), with SD3's real text widths (context 4096, pooled 2048).

Two files, each loaded by both sides from the same path, float32:
- SD3 medium-style transformer-only file in models/diffusion_models (no prefix): stock UNETLoader;
- SD3.5 medium-style whole checkpoint (qk RMSNorm, image-only attn2 in block 0; transformer under
  ``model.diffusion_model.`` beside text-encoder and VAE keys) in models/checkpoints: stock
  ``load_checkpoint_guess_config``, what CheckpointLoaderSimple calls (encoders and VAE not built).

Each case: our RankEngine on one CPU worker vs ``nodes.common_ksampler`` (what KSampler calls),
same seed, conditioning and latent; the JSON result holds each case's relative error. LoRA cases
put stock ``LoraLoaderModelOnly`` (chained) in front of KSampler and give our engine the same files;
they also record how much the LoRAs change our result (``lora_effect``).

    python tests/stock_sd3_compare.py --workdir /tmp/sd3c --out /tmp/sd3c/result.json
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stock_family_compare import one_cpu_worker, parse_args, record_case, run, start_comfyui, write_result  # noqa: E402
from stock_ksampler_compare import relative_error  # noqa: E402

TEXT_TOKENS = 40
LATENT_HW = (12, 16)  # 6 x 8 image tokens: not square, so rows and columns cannot be confused
ARCHITECTURES = {
    "sd3-medium-style": dict(num_layers=2, heads=2, head_dim=64, pos_embed_max_size=16),
    "sd3.5-medium-style": dict(num_layers=2, heads=2, head_dim=64, pos_embed_max_size=16,
                               dual_attention_layers=(0,), qk_norm="rms_norm"),
}
# The SD3 medium-style model (no qk norm) is the touchier one in float32: one forward of it is
# 1.3e-6..3.7e-6 (relative) from a float64 reference on either side, stock and ours alike, and cfg
# amplifies that. Measured: dpmpp_2m/sgm_uniform, 4 steps, cfg 3: stock 1.1e-5 and ours 1.4e-5 from
# our float64 run, 1.2e-5 from each other: float32 rounding, not semantics. So its cfg case is the
# short euler one (cfg 3: 5e-6); the SD3.5-style model (5e-7 per forward) takes cfg 4.5.
CASES = [
    # SD3's recipe in ComfyUI's examples: dpmpp_2m + sgm_uniform.
    dict(file="unet", sampler="dpmpp_2m", scheduler="sgm_uniform", steps=4, cfg=1.0, batch=1, denoise=1.0, latent="empty"),
    dict(file="unet", sampler="euler", scheduler="simple", steps=3, cfg=3.0, batch=2, denoise=1.0, latent="empty4"),
    # An SDE sampler moves a first sigma of 1 through the model sampling; karras uses its sigma range.
    dict(file="unet", sampler="dpmpp_2m_sde", scheduler="karras", steps=3, cfg=1.0, batch=2, denoise=0.6, latent="image"),
    dict(file="checkpoint", sampler="euler", scheduler="normal", steps=3, cfg=4.5, batch=1, denoise=1.0, latent="empty",
         negative_tokens=TEXT_TOKENS // 2),
    dict(file="checkpoint", sampler="heun", scheduler="beta", steps=3, cfg=4.5, batch=1, denoise=0.6, latent="image"),
    # An odd latent size: both pad to the 2x2 patch (circular) and crop back.
    dict(file="checkpoint", sampler="euler_ancestral", scheduler="simple", steps=3, cfg=4.5, batch=1, denoise=1.0,
         latent="empty", latent_hw=(11, 13)),
    # LoRAs (layout, strength, seed): Kohya (SAI names, fused qkv, attn2, swapped adaLN) on the SD3.5 file,
    # diffusers/PEFT chained with a negative-strength Kohya one on the SD3 file.
    dict(file="checkpoint", sampler="euler", scheduler="simple", steps=3, cfg=4.5, batch=1, denoise=1.0, latent="empty",
         loras=[("kohya", 0.8, 1)]),
    dict(file="unet", sampler="dpmpp_2m", scheduler="sgm_uniform", steps=3, cfg=1.0, batch=1, denoise=0.6, latent="image",
         loras=[("peft", 1.0, 2), ("kohya", -0.5, 3)]),
]


def write_loras(case: dict, model, folder: Path) -> list[tuple[str, float]]:
    """The case's LoRA files for this model's layers (in ``folder``); returns (file name, strength)."""
    from lora_files import random_sd3_lora, write_kohya_lora, write_peft_lora

    writers = {"kohya": write_kohya_lora, "peft": write_peft_lora}
    out = []
    for layout, strength, seed in case["loras"]:
        name = f"lora_{case['file']}_{layout}_{seed}.safetensors"
        if not (folder / name).exists():
            # scale 0.05 changes the result by 26% and 65% (lora_effect). Much larger random LoRAs
            # (scale 0.2: 135%) push the tiny SD3 medium-style model where float32 rounding grows
            # to 5e-5 between the two sides, though the patched weights are bit-identical
            # (tests/test_lora_sd3.py::test_matches_comfyui_patching_bit_for_bit).
            writers[layout](random_sd3_lora(model, seed=seed, scale=0.05), folder / name)
        out.append((name, strength))
    return out


def conditioning(seed: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, tokens, 4096), generator=g), torch.randn((1, 2048), generator=g)


def make_latent(case: dict, seed: int):
    import torch

    b, (h, w) = case["batch"], case.get("latent_hw", LATENT_HW)
    if case["latent"] == "empty4":
        return torch.zeros((b, 4, h, w))  # stock EmptyLatentImage
    if case["latent"] == "empty":
        return torch.zeros((b, 16, h, w))  # EmptySD3LatentImage
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 16, h, w), generator=g) * 1.2 + 0.05


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    nodes, folder_paths, comfy = start_comfyui(args)
    import comfy.sd

    from checkpoints import COMFY_PREFIX, make_sd3_diffusers_model, sd3_checkpoint_extras, write_sd3_file
    from comfy_xdit.requests import SampleRequest, SD3Conditioning

    workdir = args.workdir.resolve()
    unet_dir, checkpoint_dir = workdir / "diffusion_models", workdir / "checkpoints"
    files = {
        "unet": write_sd3_file(make_sd3_diffusers_model(**ARCHITECTURES["sd3-medium-style"], joint_attention_dim=4096,
                                                        pooled_projection_dim=2048, seed=0), unet_dir / "sd3_tiny.safetensors"),
        "checkpoint": write_sd3_file(make_sd3_diffusers_model(**ARCHITECTURES["sd3.5-medium-style"], joint_attention_dim=4096,
                                                              pooled_projection_dim=2048, seed=1),
                                     checkpoint_dir / "sd35_tiny.safetensors", prefix=COMFY_PREFIX, extra=sd3_checkpoint_extras()),
    }
    folder_paths.add_model_folder_path("diffusion_models", str(unet_dir))
    lora_dir = workdir / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    stock_models = {
        "unet": nodes.UNETLoader().load_unet(files["unet"].name, "default")[0],
        "checkpoint": comfy.sd.load_checkpoint_guess_config(str(files["checkpoint"]), output_vae=False, output_clip=False)[0],
    }
    stock_info = {}
    for name, model in stock_models.items():
        sampling = model.get_model_object("model_sampling")
        stock_info[name] = {
            "model_class": type(model.model).__name__,
            "weight_dtype": str(next(model.model.diffusion_model.parameters()).dtype),
            "manual_cast_dtype": str(model.model.manual_cast_dtype),
            "shift": float(sampling.shift), "multiplier": float(sampling.multiplier),
            "latent_format": type(model.model.latent_format).__name__,
            "x_block_self_attn_layers": sorted(getattr(model.model.diffusion_model, "x_block_self_attn_layers", []) or []),
        }
    engines = {name: one_cpu_worker(path, "sd3") for name, path in files.items()}

    positive_context, positive_pooled = conditioning(1, TEXT_TOKENS)
    results = []
    for index, case in enumerate(CASES):
        case = dict(case, seed=2000 + index)
        case["name"] = "{file}: {sampler}/{scheduler} cfg {cfg} batch {batch} denoise {denoise} {latent}".format(**case)
        if case.get("loras"):
            case["name"] += " loras " + "+".join(f"{layout} x{strength}" for layout, strength, _ in case["loras"])
        negative_context, negative_pooled = conditioning(2, case.get("negative_tokens", TEXT_TOKENS))
        latent = make_latent(case, case["seed"] + 7)

        def compare():
            stock_model = stock_models[case["file"]]
            loras = write_loras(case, engines[case["file"]].model, lora_dir) if case.get("loras") else []
            for name, strength in loras:
                stock_model = nodes.LoraLoaderModelOnly().load_lora_model_only(stock_model, name, strength)[0]
            stock = nodes.common_ksampler(
                stock_model, case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"],
                [[positive_context.clone(), {"pooled_output": positive_pooled.clone()}]],
                [[negative_context.clone(), {"pooled_output": negative_pooled.clone()}]],
                {"samples": latent.clone()}, denoise=case["denoise"])[0]["samples"]
            request = SampleRequest(
                latent=latent.clone(),
                positive=SD3Conditioning(positive_context.clone(), positive_pooled.clone()),
                negative=SD3Conditioning(negative_context.clone(), negative_pooled.clone()),
                seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"],
                scheduler=case["scheduler"], denoise=case["denoise"],
                loras=tuple((str(lora_dir / name), strength) for name, strength in loras))
            ours = engines[case["file"]].sample(request)
            if loras:  # how much the LoRAs change the result: the comparison is only as strong as this
                case["lora_effect"] = relative_error(ours, engines[case["file"]].sample(dataclasses.replace(request, loras=())))[0]
            return ours, stock

        results.append(record_case(case, compare))

    return write_result(args, stock_info, results, started)


if __name__ == "__main__":
    run(main)
