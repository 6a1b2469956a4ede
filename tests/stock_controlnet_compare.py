#!/usr/bin/env python
"""One worker with a Flux ControlNet against stock ComfyUI on the same files.

Runs in its own process (like stock_ksampler_compare.py, whose ComfyUI import it reuses):

1. builds a full-width Flux-dev file (1 double + 1 single block, BFL layout) and a full-width
   InstantX union ControlNet (1 double + 1 single block, diffusers layout, every weight random),
   and a random full-width Flux VAE with an encoder (the control image is VAE-encoded);
2. stock: UNETLoader + ControlNetLoader (+ SetUnionControlNetType) + ControlNetApplyAdvanced +
   KSampler, through ComfyUI's own functions; then frees the stock models (memory);
3. ours: RankEngine on one CPU worker, the control hint made by the bridge's controlnet_hint
   (what ParallelControlNetApply sends) with the same stock VAE object;
4. writes JSON: per case the relative error ours vs stock, and how far the ControlNet moved
   stock's own result (so the comparison cannot pass with the control ignored).

    python tests/stock_controlnet_compare.py --workdir /tmp/scc --out /tmp/scc/result.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stock_ksampler_compare import DEFAULT_COMFYUI, conditioning, import_comfyui, relative_error  # noqa: E402

TEXT_TOKENS = 8
LATENT_HW = (6, 8)
GUIDANCE = 3.5
# Not the defaults: strength, percent ranges, a union mode, cfg with a negative, batch 2 with two
# control images, img2img; the control image is smaller than the latent's pixels and not of its aspect.
CASES = [
    dict(name="euler/simple strength 0.7 range 0.2-0.8", sampler="euler", scheduler="simple", steps=4, cfg=1.0,
         strength=0.7, start=0.2, end=0.8, union="auto", batch=1, images=1, denoise=1.0),
    dict(name="dpmpp_2m/beta cfg 2.5 strength 1.3 range 0-0.6 union depth", sampler="dpmpp_2m", scheduler="beta", steps=3,
         cfg=2.5, strength=1.3, start=0.0, end=0.6, union="depth", batch=1, images=1, denoise=1.0),
    dict(name="euler/normal batch 2, two control images, img2img 0.8", sampler="euler", scheduler="normal", steps=3,
         cfg=1.0, strength=0.5, start=0.0, end=1.0, union="auto", batch=2, images=2, denoise=0.8),
]


def build_files(workdir: Path) -> tuple[Path, Path]:
    import torch

    from checkpoints import write_stock_flux_file
    from controlnet_files import make_flux_controlnet, write_instantx_file

    workdir.mkdir(parents=True, exist_ok=True)
    main = write_stock_flux_file(workdir / "unet" / "xdit_cn_compare_flux.safetensors", num_layers=1, num_single_layers=1, seed=0)
    gc.collect()
    with torch.no_grad():
        controlnet = make_flux_controlnet(num_layers=1, num_single_layers=1, heads=24, head_dim=128, joint_attention_dim=4096,
                                          pooled_projection_dim=768, guidance=True, num_mode=10, seed=7)
        path = write_instantx_file(controlnet, workdir / "controlnet" / "xdit_cn_compare_instantx.safetensors")
    del controlnet
    gc.collect()
    return main, path


def make_vae(comfy):
    import comfy.sd

    from vae_files import make_ldm_encoder_state_dict, make_ldm_vae_state_dict

    return comfy.sd.VAE(sd={**make_ldm_vae_state_dict(seed=2), **make_ldm_encoder_state_dict(seed=3)})


def inputs_for(case: dict):
    import torch

    g = torch.Generator().manual_seed(11 + case["batch"])
    images = torch.rand((case["images"], 40, 56, 3), generator=g)  # stock LoadImage's IMAGE layout
    h, w = LATENT_HW
    latent = torch.zeros((case["batch"], 16, h, w)) if case["denoise"] == 1.0 else torch.randn((case["batch"], 16, h, w), generator=g)
    return images, latent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--comfyui", type=Path, default=DEFAULT_COMFYUI)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    nodes, folder_paths, comfy = import_comfyui(args.comfyui)
    from comfy.cldm.control_types import UNION_CONTROLNET_TYPES
    from comfy_extras.nodes_controlnet import SetUnionControlNetType

    from comfy_xdit.bridge import ControlNetUse, XditControlNet, controlnet_hint, open_controlnet
    from comfy_xdit.config import ParallelConfig
    from comfy_xdit.engine import RankEngine
    from comfy_xdit.mesh import ParallelMesh
    from comfy_xdit.requests import ControlNetRequest, FluxConditioning, ModelSpec, SampleRequest

    timings = {}
    t = time.perf_counter()
    main_file, controlnet_file = build_files(args.workdir.resolve())
    timings["build_s"] = time.perf_counter() - t
    vae = make_vae(comfy)
    positive_context, positive_pooled = conditioning(1, TEXT_TOKENS)
    negative_context, negative_pooled = conditioning(2, TEXT_TOKENS - 3)

    # --- stock ---
    t = time.perf_counter()
    folder_paths.add_model_folder_path("diffusion_models", str(main_file.parent))
    folder_paths.add_model_folder_path("controlnet", str(controlnet_file.parent))
    stock_model = nodes.UNETLoader().load_unet(main_file.name, "default")[0]
    stock_controlnet = nodes.ControlNetLoader().load_controlnet(controlnet_file.name)[0]
    timings["stock_load_s"] = time.perf_counter() - t
    stock_info = {"controlnet_class": type(stock_controlnet.control_model).__name__,
                  "controlnet_dtype": str(stock_controlnet.control_model.dtype),
                  "manual_cast_dtype": str(stock_controlnet.manual_cast_dtype),
                  "latent_input": bool(stock_controlnet.control_model.latent_input),
                  "union_modes": int(stock_controlnet.control_model.num_union_modes),
                  "model_double_single": [len(stock_model.model.diffusion_model.double_blocks), len(stock_model.model.diffusion_model.single_blocks)]}
    stock_out, stock_plain = {}, {}
    for case in CASES:
        images, latent = inputs_for(case)
        seed = 500 + len(stock_out)
        positive = [[positive_context.clone(), {"pooled_output": positive_pooled.clone(), "guidance": GUIDANCE}]]
        negative = [[negative_context.clone(), {"pooled_output": negative_pooled.clone(), "guidance": GUIDANCE}]]
        cnet = SetUnionControlNetType.execute(stock_controlnet, case["union"]).args[0]
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cnet, images, case["strength"],
                                                                    case["start"], case["end"], vae=vae)
        run = lambda p, n: nodes.common_ksampler(stock_model, seed, case["steps"], case["cfg"], case["sampler"],  # noqa: E731
                                                 case["scheduler"], p, n, {"samples": latent.clone()}, denoise=case["denoise"])[0]["samples"]
        t = time.perf_counter()
        stock_out[case["name"]] = run(pos, neg)
        case["stock_s"] = time.perf_counter() - t
        stock_plain[case["name"]] = run(positive, negative)
        case["seed"] = seed
    del stock_model, stock_controlnet, cnet, pos, neg
    comfy.model_management.unload_all_models()
    gc.collect()

    # --- ours ---
    t = time.perf_counter()
    engine = RankEngine(ParallelMesh.build(ParallelConfig(devices=("cpu",)), torch.device("cpu")))
    engine.load(ModelSpec(str(main_file), dtype="float32"))
    handle: XditControlNet = open_controlnet(str(controlnet_file))
    timings["ours_load_s"] = time.perf_counter() - t
    for case in CASES:
        images, latent = inputs_for(case)
        use = ControlNetUse(handle, images, case["strength"], case["start"], case["end"], vae,
                            UNION_CONTROLNET_TYPES.get(case["union"]))
        hint = controlnet_hint(use, LATENT_HW)
        request = SampleRequest(
            latent=latent.clone(),
            positive=FluxConditioning(positive_context.clone(), positive_pooled.clone(), GUIDANCE),
            negative=FluxConditioning(negative_context.clone(), negative_pooled.clone(), GUIDANCE) if case["cfg"] != 1.0 else None,
            seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"], scheduler=case["scheduler"],
            denoise=case["denoise"],
            controlnets=(ControlNetRequest(str(controlnet_file), hint, use.strength, use.start_percent, use.end_percent, use.mode),),
        )
        t = time.perf_counter()
        ours = engine.sample(request)
        case["ours_s"] = time.perf_counter() - t
        stock = stock_out[case["name"]]
        case["rel_error"], case["abs_error"] = relative_error(ours, stock)
        case["control_effect"] = relative_error(stock_plain[case["name"]], stock)[0]
        print(f"{case['name']:<60} rel {case['rel_error']:.2e}  control moved stock by {case['control_effect']:.2e}",
              file=sys.stderr, flush=True)
    timings["total_s"] = time.perf_counter() - started
    result = {"stock": stock_info, "cases": CASES, "timings": timings, "controlnet_loads": engine.controlnets.load_count}
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    sys.exit(main())
