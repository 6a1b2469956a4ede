#!/usr/bin/env python
"""One worker of comfy_xdit against stock ComfyUI's KSampler on HunyuanDiT files (a few cases).

Like tests/stock_pixart_compare.py, in its own process because it imports ComfyUI's top-level
modules. ComfyUI's HunyuanDiT pins 16 heads, the text widths (BERT 1024, mT5 2048), the text
lengths (77 + 256) and the pooled width (1024); width and depth come from the keys, and it takes
a file for v1.0/1.1 (size and style conditions) only when the extra embedder is 3968 wide, which
pins that file's width to DiT-g/2's 1408. So, written at test time in bfloat16 (both sides compute
in float32 from the same values):

- a v1.2-style file (no size / style conditions), width 128, 4 blocks (one long skip connection),
  in models/diffusion_models, no prefix: stock UNETLoader (about 85 MB);
- a v1.0/1.1-style file, width 1408, 1 block, under ComfyUI's ``model.diffusion_model.`` prefix in
  models/checkpoints: stock ``load_checkpoint_guess_config`` (about 220 MB).

Each case: our RankEngine on one CPU worker vs ``nodes.common_ksampler`` (what KSampler calls), same
seed, conditioning (masks hiding padded tokens, as the stock encoders give them) and latent; one
more case compares a single model call on the same inputs.

Why the v1.0/1.1 file differs by more than 1e-5 after sampling: its schedule (betas up to 0.03)
starts at sigma_max = 419.9, so the first step works on x = noise * 420 and takes x0 back out of
it (x - (x - x0)): float32 keeps x to about 420 * 4 * 6e-8 = 1e-4 absolute, so the last-bit
differences of the two attention implementations (one model call agrees to about 4e-7) come back
as a few 1e-5 of x0. Stock ComfyUI against itself with another attention kernel varies the same
way. The v1.2 schedule (sigma_max 45.4) keeps every case under 1e-5.

    python tests/stock_hunyuan_dit_compare.py --workdir /tmp/hdc --out /tmp/hdc/result.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stock_family_compare import one_cpu_worker, parse_args, record_case, run, start_comfyui, write_result  # noqa: E402

LATENT_HW = (14, 10)  # 7 x 5 image tokens: not square, so the rotary crop starts inside the base grid
CASES = [
    dict(file="unet", sampler="euler", scheduler="normal", steps=3, cfg=1.0, batch=1, denoise=1.0, latent="empty"),
    dict(file="unet", sampler="dpmpp_2m", scheduler="karras", steps=3, cfg=6.0, batch=2, denoise=1.0, latent="empty"),
    dict(file="unet", sampler="euler_ancestral", scheduler="simple", steps=3, cfg=6.0, batch=1, denoise=0.6, latent="image"),
    dict(file="unet", sampler="heun", scheduler="sgm_uniform", steps=2, cfg=6.0, batch=1, denoise=1.0, latent="empty"),
    dict(file="unet", sampler="euler", scheduler="normal", steps=2, cfg=6.0, batch=1, denoise=1.0, latent="empty",
         hw=(13, 11)),  # odd sides: ComfyUI pads circularly and crops back
    dict(file="checkpoint", sampler="heun", scheduler="sgm_uniform", steps=2, cfg=6.0, batch=1, denoise=1.0, latent="empty"),
    # a size on the conditioning: v1.0/1.1's image meta size
    dict(file="checkpoint", sampler="dpmpp_2m", scheduler="normal", steps=2, cfg=6.0, batch=1, denoise=1.0, latent="empty",
         size=(1024, 768)),
    # one model call on the same inputs (the first step's, at sigma_max): no sampler arithmetic
    dict(file="checkpoint", sampler="forward", scheduler="-", steps=1, cfg=1.0, batch=1, denoise=1.0, latent="empty"),
]


def conditioning(seed: int, padded: int) -> tuple:
    """(BERT tokens, extras) in the stock HunyuanDiT encoders' layout; the last ``padded`` tokens masked."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mask, mask_t5 = torch.ones(1, 77, dtype=torch.long), torch.ones(1, 256, dtype=torch.long)
    mask[:, 77 - padded:], mask_t5[:, 256 - 3 * padded:] = 0, 0
    extras = {"pooled_output": torch.randn(1, 1024, generator=g), "attention_mask": mask,
              "conditioning_mt5xl": torch.randn(1, 256, 2048, generator=g), "attention_mask_mt5xl": mask_t5}
    return torch.randn(1, 77, 1024, generator=g), extras


def make_latent(case: dict, seed: int):
    import torch

    b, (h, w) = case["batch"], case.get("hw", LATENT_HW)
    if case["latent"] == "empty":
        return torch.zeros((b, 4, h, w))  # stock EmptyLatentImage
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 4, h, w), generator=g) * 4.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    nodes, folder_paths, comfy = start_comfyui(args)
    import comfy.sd
    import torch

    from comfy_xdit.bridge import hunyuan_dit_conditioning
    from comfy_xdit.requests import SampleRequest
    from hunyuan_dit_files import COMFY_PREFIX, make_hunyuan_dit_diffusers_model, write_original_hunyuan_dit_file

    workdir = args.workdir.resolve()
    unet_dir, checkpoint_dir = workdir / "diffusion_models", workdir / "checkpoints"
    stock_text = dict(heads=16, text_width=1024, t5_width=2048, pooled=1024, text_len=77, text_len_t5=256)
    files = {
        "unet": write_original_hunyuan_dit_file(
            make_hunyuan_dit_diffusers_model(num_layers=4, head_dim=8, meta=False, seed=0, **stock_text),
            unet_dir / "hunyuan_dit_1.2_tiny.safetensors", dtype=torch.bfloat16),
        "checkpoint": write_original_hunyuan_dit_file(
            make_hunyuan_dit_diffusers_model(num_layers=1, head_dim=88, meta=True, seed=1, **stock_text),
            checkpoint_dir / "hunyuan_dit_1.1_tiny.safetensors", prefix=COMFY_PREFIX, dtype=torch.bfloat16),
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
            "size_cond": bool(model.model.diffusion_model.size_cond),
            "linear_end": float(model.model.model_config.sampling_settings.get("linear_end", 0.0)),
        }
    engines = {name: one_cpu_worker(path, "hunyuan_dit") for name, path in files.items()}

    results = []
    for index, case in enumerate(CASES):
        case = dict(case, seed=4000 + index)
        case["name"] = "{file}: {sampler}/{scheduler} cfg {cfg} batch {batch} denoise {denoise} {latent}".format(**case)
        positive, negative = conditioning(1, 5), conditioning(2, 20)
        if "size" in case:
            height, width = case["size"]
            for _, extras in (positive, negative):
                extras.update(width=width, height=height)
            case["name"] += f" size {height}x{width}"
        if "hw" in case:
            case["name"] += " latent {}x{}".format(*case["hw"])
        latent = make_latent(case, case["seed"] + 7)

        def stock_cond(entry):
            tokens, extras = entry
            return [[tokens.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extras.items()}]]

        def forward():
            # The stock model and ours on the same model input (noise at sigma_max, scaled by c_in), timestep 999.
            from comfy_xdit.models.hunyuan_dit import meta_size

            tokens, extras = stock_cond(positive)[0]
            x, t = torch.randn(latent.shape, generator=torch.Generator().manual_seed(case["seed"])), torch.tensor([999.0])
            meta = torch.tensor([meta_size((None,) * 4, *latent.shape[-2:])])
            stock = stock_models[case["file"]].model.diffusion_model(
                x, t, tokens.clone(), text_embedding_mask=extras["attention_mask"],
                encoder_hidden_states_t5=extras["conditioning_mt5xl"], text_embedding_mask_t5=extras["attention_mask_mt5xl"],
                image_meta_size=meta)
            ours = engines[case["file"]]._denoiser(x, engines[case["file"]]._denoiser.sampling.sigma(t),
                                                   hunyuan_dit_conditioning(stock_cond(positive), "positive"))
            return ours, stock

        def compare():
            if case["sampler"] == "forward":
                with torch.no_grad():
                    return forward()
            stock = nodes.common_ksampler(
                stock_models[case["file"]], case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"],
                stock_cond(positive), stock_cond(negative), {"samples": latent.clone()}, denoise=case["denoise"])[0]["samples"]
            ours = engines[case["file"]].sample(SampleRequest(
                latent=latent.clone(),
                # the bridge's reader: the same CONDITIONING the stock sampler got
                positive=hunyuan_dit_conditioning(stock_cond(positive), "positive"),
                negative=hunyuan_dit_conditioning(stock_cond(negative), "negative"),
                seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"],
                scheduler=case["scheduler"], denoise=case["denoise"]))
            return ours, stock

        results.append(record_case(case, compare))

    return write_result(args, stock_info, results, started)


if __name__ == "__main__":
    run(main)
