#!/usr/bin/env python
"""One worker of comfy_xdit against stock ComfyUI's KSampler, on one full-width Flux file.

Runs in its own process (the pytest test starts it; it can also be run by hand), because it
imports ComfyUI's top-level modules (``nodes``, ``comfy``, ``folder_paths``), which must stay out
of the test process. In this one process it:

1. builds (or takes) a full-width Flux-dev checkpoint in the BFL layout ComfyUI users have:
   24 heads x 128, 1 double block, 0 single blocks, random weights with a fixed seed;
2. loads it twice from the same file: with stock ``nodes.UNETLoader`` (ComfyUI 0.3.75 started
   with ``--cpu``) and with ``comfy_xdit.engine.RankEngine`` on one CPU worker, both float32;
3. samples every case of the grid on both sides with the same seed, conditioning and latent,
   stock through ``nodes.common_ksampler`` (what the KSampler node calls);
4. writes JSON with the relative error ``max|ours - stock| / max|stock|`` of each case.

The grid: every sampler_name x scheduler the ParallelSampler node offers, each pair once, in one
of five variants taken in turn (txt2img from a 4-channel EmptyLatentImage latent at batch 1 and
2; img2img at denoise 0.6 at batch 1 and 2; img2img with cfg 2.5 against a negative), so every
sampler meets every variant; each sampler runs the fewest steps that reach all its branches
(STEPS). Then a few single cases: latent batch_index, an odd latent size, max_shift/base_shift
against stock's ModelSamplingFlux node, LoRAs (Kohya, PEFT, chained, negative strength) against
stock LoraLoaderModelOnly, and cfg with a negative of another text length.

    python tests/stock_ksampler_compare.py --workdir /tmp/skc --out /tmp/skc/result.json
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_COMFYUI = REPO / ".comfyui" / "ComfyUI"

CHECKPOINT_NAME = "xdit_stock_compare_flux.safetensors"
# Small, so the grid stays cheap on 2 cores (the model's matmuls cost in proportion to the tokens):
# a 48x64-pixel latent (3x4 image tokens; not square, so rows and columns cannot be confused)
# and 8 text tokens.
TEXT_TOKENS = 8
LATENT_HW = (6, 8)
GUIDANCE = 3.5
BASE_SEED = 1000


def import_comfyui(comfyui: Path):
    """Import stock ComfyUI's nodes as its main.py would with ``--cpu``; returns the modules."""
    if not (comfyui / "nodes.py").exists():
        raise SystemExit(f"ComfyUI not found at {comfyui}")
    # ComfyUI's top-level names (nodes, utils, app, ...) must win over anything else on the path,
    # this repo's own nodes.py included.
    sys.path.insert(0, str(comfyui))
    argv = sys.argv
    sys.argv = [str(comfyui / "main.py"), "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()  # comfy.cli_args then parses sys.argv
        import comfy.cli_args
        import comfy.model_management
        import comfy.samplers
        import comfy.utils
        import folder_paths
        import nodes
    finally:
        sys.argv = argv
    assert comfy.cli_args.args.cpu, "ComfyUI did not see --cpu"
    for module in (nodes, folder_paths, comfy.samplers):
        assert Path(module.__file__).resolve().is_relative_to(comfyui.resolve()), f"{module.__name__} came from {module.__file__}"
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return nodes, folder_paths, comfy


# The fewest steps that take each sampler through every branch it has for a flow model: the
# two-evaluation samplers do their full step first and a plain one to sigma 0 last; the multistep
# ones need a step with history before the last (3m_sde: two steps of history, ipndm: order 4).
STEPS = {
    "euler": 2, "euler_ancestral": 2, "heun": 3, "heunpp2": 3, "dpm_2": 2, "dpm_2_ancestral": 2,
    "lms": 4, "dpmpp_2s_ancestral": 2, "dpmpp_sde": 2, "dpmpp_sde_gpu": 2, "dpmpp_2m": 3,
    "dpmpp_2m_sde": 3, "dpmpp_2m_sde_gpu": 3, "dpmpp_2m_sde_heun": 3, "dpmpp_2m_sde_heun_gpu": 3,
    "dpmpp_3m_sde": 4, "dpmpp_3m_sde_gpu": 4, "ipndm": 5, "res_multistep": 3, "res_multistep_ancestral": 3,
}
DEFAULT_STEPS = 3
# Heun ends its second evaluation at the schedule's next sigma and takes d_2 = (x_2 - denoised_2)
# / sigma there. normal and karras end on sigma_min = 3.16e-4, where that division turns the
# float32 rounding of denoised_2 (the same in stock) into noise of eps*|x|/sigma_min ~ 1e-4 in d_2,
# which the step carries into x times |dt|. After a long step (|dt| 0.76 for normal at 2-3 steps,
# 1.0 for karras at 2) the two sides then differ by 1.5e-5..3.3e-5 from model rounding of 1e-7
# alone, so heun runs these pairs with a short last step: karras at 3 steps (|dt| 0.05); normal
# needs many steps (14 at denoise 0.6: |dt| 0.13).
PAIR_STEPS = {("heun", "normal"): 14}

# Each sampler x scheduler pair runs once, in one of these variants, taken in turn so that every
# sampler meets every variant once and every scheduler meets each variant len(samplers)/5 times.
VARIANTS = [
    dict(variant="txt2img", batch=1, denoise=1.0, latent="empty4"),
    dict(variant="txt2img-batch2", batch=2, denoise=1.0, latent="empty4"),
    dict(variant="img2img-0.6-batch2", batch=2, denoise=0.6, latent="image"),
    dict(variant="img2img-0.6", batch=1, denoise=0.6, latent="image"),  # heun/normal's: its many steps at batch 1
    dict(variant="img2img-0.6-cfg2.5", batch=1, denoise=0.6, latent="image", cfg=2.5),
]


def build_cases(samplers: list[str], schedulers: list[str], steps: int | None, only: set[str] | None) -> list[dict]:
    cases = []

    def add(group, sampler, scheduler, **kw):
        case_steps = steps or PAIR_STEPS.get((sampler, scheduler)) or STEPS.get(sampler, DEFAULT_STEPS)
        case = dict(group=group, variant=group, sampler=sampler, scheduler=scheduler, steps=case_steps,
                    cfg=1.0, denoise=1.0, batch=1, latent="empty4", batch_index=None,
                    negative_tokens=TEXT_TOKENS, max_shift=None, base_shift=None)
        case.update(kw)
        case["seed"] = BASE_SEED + len(cases)
        case["name"] = "{sampler}/{scheduler} {variant}".format(**case)
        if only is None or case["name"] in only or group in only or sampler in only:
            cases.append(case)

    for i, sampler in enumerate(samplers):
        for j, scheduler in enumerate(schedulers):
            add("grid", sampler, scheduler, **VARIANTS[(i + j) % len(VARIANTS)])
    # A latent cut from a larger batch keeps that batch's noise (LatentFromBatch sets batch_index).
    add("batch_index", "euler_ancestral", "simple", variant="batch_index", latent="image", batch=2,
        denoise=0.6, batch_index=[3, 1])
    add("batch_index", "dpmpp_2m_sde", "karras", variant="batch_index", batch=2, batch_index=[2, 0])
    # An odd latent size: both pad to the patch size (circular) and crop back.
    add("odd_size", "euler", "beta", variant="latent-5x7", latent="image", latent_hw=(5, 7), denoise=0.6)
    # ParallelSampler's max_shift/base_shift against stock's ModelSamplingFlux node on the model.
    add("model_sampling_flux", "euler", "simple", variant="ModelSamplingFlux-1.15-0.5", max_shift=1.15, base_shift=0.5)
    add("model_sampling_flux", "dpmpp_2m_sde", "beta", variant="ModelSamplingFlux-2.0-1.0", max_shift=2.0, base_shift=1.0,
        latent="image", denoise=0.6)
    # LoRAs against stock LoraLoaderModelOnly (chained for two): the layouts users have, a
    # negative strength, and img2img with cfg. They sit before the last group so the cases after
    # them also check that our weights were restored exactly when the request names no LoRA.
    add("lora", "euler", "simple", variant="lora-kohya-0.8", loras=[("kohya", 0.8, 1)])
    add("lora", "dpmpp_2m", "karras", variant="lora-kohya-0.8+peft--0.5-img2img-cfg2.5",
        loras=[("kohya", 0.8, 1), ("peft", -0.5, 2)], latent="image", denoise=0.6, cfg=2.5)
    # Positive and negative of different lengths under cfg: stock runs cond and uncond in one
    # batch only when their shapes agree (Flux's c_crossattn is a CONDRegular, which never pads),
    # else one model call each; either way each must see only its own text.
    for tokens in (TEXT_TOKENS // 2, TEXT_TOKENS + 4):
        add("negative_length", "euler", "simple", variant=f"cfg2.5-negative-{tokens}-tokens", cfg=2.5,
            negative_tokens=tokens)
    return cases


def write_loras(case: dict, model, folder: Path) -> list[tuple[str, float]]:
    """The case's LoRA files for our model's layers (in ``folder``); returns (file name, strength)."""
    from lora_files import random_flux_lora, write_kohya_lora, write_peft_lora

    writers = {"kohya": write_kohya_lora, "peft": write_peft_lora}
    named = []
    for layout, strength, seed in case["loras"]:
        name = f"lora_{layout}_{seed}.safetensors"
        if not (folder / name).exists():
            writers[layout](random_flux_lora(model, seed=seed), folder / name)
        named.append((name, strength))
    return named


def conditioning(seed: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    context = torch.randn((1, tokens, 4096), generator=g)
    pooled = torch.randn((1, 768), generator=g)
    return context, pooled


def make_latent(case: dict):
    import torch

    b, (h, w) = case["batch"], case.get("latent_hw", LATENT_HW)
    if case["latent"] == "empty4":
        return torch.zeros((b, 4, h, w))  # what stock EmptyLatentImage gives
    g = torch.Generator().manual_seed(case["seed"] + 7)
    return torch.randn((b, 16, h, w), generator=g) * 2.0 + 0.1  # roughly a Flux VAE latent's spread


def relative_error(ours, stock) -> tuple[float, float]:
    ours, stock = ours.double(), stock.double()
    if ours.shape != stock.shape:
        raise ValueError(f"shapes differ: ours {tuple(ours.shape)}, stock {tuple(stock.shape)}")
    if not (torch_isfinite(ours) and torch_isfinite(stock)):
        return math.inf, math.inf
    abs_err = (ours - stock).abs().max().item()
    return abs_err / stock.abs().max().item(), abs_err


def torch_isfinite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an existing full-width Flux BFL file (else one is built in --workdir)")
    parser.add_argument("--workdir", type=Path, help="where to build the checkpoint")
    parser.add_argument("--out", type=Path, help="write the JSON result here (else it is printed)")
    parser.add_argument("--comfyui", type=Path, default=DEFAULT_COMFYUI)
    parser.add_argument("--steps", type=int, help="steps for every case (default: per sampler, see STEPS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", action="append", help="a case name, group or sampler_name; repeatable")
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.workdir is None:
        parser.error("give --checkpoint or --workdir")

    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    nodes, folder_paths, comfy = import_comfyui(args.comfyui)

    from comfy_xdit.config import ParallelConfig
    from comfy_xdit.engine import RankEngine
    from comfy_xdit.mesh import ParallelMesh
    from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest
    from comfy_xdit.sampling.samplers import SAMPLERS
    from comfy_xdit.sampling.schedules import SCHEDULERS

    timings: dict[str, float] = {}
    if args.checkpoint is not None:
        checkpoint = args.checkpoint.resolve()
    else:
        sys.path.insert(1, str(HERE))  # after ComfyUI: tests/checkpoints.py
        from checkpoints import write_stock_flux_file

        t = time.perf_counter()
        checkpoint = write_stock_flux_file(args.workdir.resolve() / CHECKPOINT_NAME, num_layers=1, num_single_layers=0, seed=0)
        timings["build_checkpoint_s"] = time.perf_counter() - t
        gc.collect()

    # Stock side: the file as a user's models/diffusion_models entry, loaded by UNETLoader.
    t = time.perf_counter()
    folder_paths.add_model_folder_path("diffusion_models", str(checkpoint.parent))
    stock_model = nodes.UNETLoader().load_unet(checkpoint.name, "default")[0]
    timings["stock_load_s"] = time.perf_counter() - t
    diffusion_model = stock_model.model.diffusion_model
    stock_dtype = str(next(diffusion_model.parameters()).dtype)
    stock_info = {
        "weight_dtype": stock_dtype,
        "manual_cast_dtype": str(stock_model.model.manual_cast_dtype),
        "model_class": type(stock_model.model).__name__,
        "double_blocks": len(diffusion_model.double_blocks),
        "single_blocks": len(diffusion_model.single_blocks),
        "hidden_size": diffusion_model.hidden_size,
        "shift": float(stock_model.get_model_object("model_sampling").shift),
    }
    if stock_dtype != "torch.float32" or stock_model.model.manual_cast_dtype is not None:
        raise SystemExit(f"stock ComfyUI did not run the model in float32: {stock_info}")

    # Our side: one CPU worker in this process.
    t = time.perf_counter()
    engine = RankEngine(ParallelMesh.build(ParallelConfig(devices=("cpu",)), torch.device("cpu")))
    engine.load(ModelSpec(str(checkpoint), dtype="float32"))
    timings["ours_load_s"] = time.perf_counter() - t

    lora_folder = Path(tempfile.mkdtemp(prefix="xdit_stock_loras_"))
    atexit.register(shutil.rmtree, lora_folder, True)  # the cases' LoRA files, written per run
    folder_paths.add_model_folder_path("loras", str(lora_folder))
    sys.path.insert(1, str(HERE))  # after ComfyUI: tests/lora_files.py

    samplers, schedulers = list(SAMPLERS), list(SCHEDULERS)
    stock_samplers, stock_schedulers = list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    missing = [s for s in samplers if s not in stock_samplers] + [s for s in schedulers if s not in stock_schedulers]
    if missing:
        raise SystemExit(f"offered but unknown to stock KSampler: {missing}")

    cases = build_cases(samplers, schedulers, args.steps, set(args.only) if args.only else None)
    positive_context, positive_pooled = conditioning(1, TEXT_TOKENS)
    ours_s = stock_s = 0.0
    for case in cases:
        negative_context, negative_pooled = conditioning(2, case["negative_tokens"])
        latent = make_latent(case)
        try:
            stock_positive = [[positive_context.clone(), {"pooled_output": positive_pooled.clone(), "guidance": GUIDANCE}]]
            stock_negative = [[negative_context.clone(), {"pooled_output": negative_pooled.clone(), "guidance": GUIDANCE}]]
            latent_dict = {"samples": latent.clone()}
            if case["batch_index"] is not None:
                latent_dict["batch_index"] = list(case["batch_index"])
            model = stock_model
            loras = write_loras(case, engine.model, lora_folder) if case.get("loras") else []
            for name, strength in loras:
                model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
            if case["max_shift"] is not None:
                from comfy_extras.nodes_model_advanced import ModelSamplingFlux

                height, width = latent.shape[-2:]
                model = ModelSamplingFlux().patch(stock_model, case["max_shift"], case["base_shift"], width * 8, height * 8)[0]
            t = time.perf_counter()
            stock = nodes.common_ksampler(
                model, case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"],
                stock_positive, stock_negative, latent_dict, denoise=case["denoise"])[0]["samples"]
            case["stock_s"] = time.perf_counter() - t

            request = SampleRequest(
                latent=latent.clone(),
                positive=FluxConditioning(positive_context.clone(), positive_pooled.clone(), GUIDANCE),
                negative=FluxConditioning(negative_context.clone(), negative_pooled.clone(), GUIDANCE),
                seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler_name=case["sampler"],
                scheduler=case["scheduler"], denoise=case["denoise"],
                batch_index=list(case["batch_index"]) if case["batch_index"] is not None else None,
                max_shift=case["max_shift"], base_shift=case["base_shift"],
                loras=tuple((str(lora_folder / name), strength) for name, strength in loras),
            )
            t = time.perf_counter()
            ours = engine.sample(request)
            case["ours_s"] = time.perf_counter() - t
            if loras:  # how much the LoRAs change the result: the comparison is only as strong as this
                without = engine.sample(dataclasses.replace(request, loras=()))
                case["lora_effect"] = relative_error(ours, without)[0]
            ours_s += case["ours_s"]
            stock_s += case["stock_s"]
            case["rel_error"], case["abs_error"] = relative_error(ours, stock)
            case["stock_max"] = stock.abs().max().item()
        except Exception as error:  # noqa: BLE001 - recorded per case; the test lists them
            case["rel_error"] = math.inf
            case["error"] = f"{type(error).__name__}: {error}"
            case["traceback"] = traceback.format_exc(limit=6)
        status = "ok  " if case["rel_error"] < 1e-5 else "FAIL"
        print(f"{status} {case['name']:<50} rel {case['rel_error']:.2e}"
              + (f"  {case['error']}" if "error" in case else ""), file=sys.stderr, flush=True)

    timings.update(ours_sampling_s=ours_s, stock_sampling_s=stock_s, total_s=time.perf_counter() - started)
    result = {
        "checkpoint": str(checkpoint),
        "steps": args.steps or STEPS,
        "text_tokens": TEXT_TOKENS,
        "latent": list(LATENT_HW),
        "stock": stock_info,
        "samplers": samplers,
        "schedulers": schedulers,
        "stock_only_samplers": [s for s in stock_samplers if s not in samplers],
        "stock_only_schedulers": [s for s in stock_schedulers if s not in schedulers],
        "timings": timings,
        "cases": cases,
    }
    text = json.dumps(result, indent=1, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    worst = max(cases, key=lambda c: c["rel_error"], default=None)
    if worst is not None:
        print(f"worst case: {worst['name']} rel {worst['rel_error']:.2e}; timings "
              + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    sys.exit(main())
