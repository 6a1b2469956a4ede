"""Write the pack's workflows in both of ComfyUI's formats from one description each.

    python tools/make_workflows.py

UI format (workflows/*.json) is what the canvas loads by drag-and-drop and what the template
browser lists; API format (workflows/api/*.json) is what POST /prompt takes. Generating both
from one graph keeps the twins from drifting apart.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# class -> (widget names in the order the node shows them, linked inputs, outputs)
NODE_TYPES = {
    "DualCLIPLoader": (["clip_name1", "clip_name2", "type", "device"], [], [("CLIP", "CLIP")]),
    "TripleCLIPLoader": (["clip_name1", "clip_name2", "clip_name3"], [], [("CLIP", "CLIP")]),
    "CLIPLoader": (["clip_name", "type", "device"], [], [("CLIP", "CLIP")]),
    "CheckpointLoaderSimple": (["ckpt_name"], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "EmptyHunyuanLatentVideo": (["width", "height", "length", "batch_size"], [], [("LATENT", "LATENT")]),
    "EmptyMochiLatentVideo": (["width", "height", "length", "batch_size"], [], [("LATENT", "LATENT")]),
    "VAEDecode": ([], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "VAEDecodeTiled": (["tile_size", "overlap", "temporal_size", "temporal_overlap"], [("samples", "LATENT"), ("vae", "VAE")],
                       [("IMAGE", "IMAGE")]),
    "SaveAnimatedWEBP": (["filename_prefix", "fps", "lossless", "quality", "method"], [("images", "IMAGE")], []),
    "CLIPTextEncode": (["text"], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": (["guidance"], [("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": (["width", "height", "batch_size"], [], [("LATENT", "LATENT")]),
    "VAELoader": (["vae_name"], [], [("VAE", "VAE")]),
    "EmptyLatentImage": (["width", "height", "batch_size"], [], [("LATENT", "LATENT")]),
    "LoadImage": (["image", "upload"], [], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "VAEEncode": ([], [("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")]),
    "SaveImage": (["filename_prefix"], [("images", "IMAGE")], []),
    "ParallelLoader": (
        ["model_name", "weight_dtype", "ulysses_degree", "ring_degree", "use_cfg_parallel", "data_parallel_degree",
         "pipefusion_parallel_degree", "devices", "attention_backend", "compile"], [], [("XDIT_MODEL", "XDIT_MODEL")]),
    "ParallelLoraLoader": (["lora_name", "strength_model"], [("model", "XDIT_MODEL")], [("XDIT_MODEL", "XDIT_MODEL")]),
    "ParallelSampler": (
        ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise", "shift", "max_shift",
         "base_shift"],
        [("model", "XDIT_MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        [("LATENT", "LATENT")]),
    "ParallelVAEDecode": ([], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "ParallelClassLabel": (["class_id"], [], [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "ParallelFolderVAEDecode": (["tiled"], [("samples", "LATENT"), ("model", "XDIT_MODEL")], [("IMAGE", "IMAGE")]),
    "ParallelControlNetLoader": (["control_net_name"], [], [("XDIT_CONTROL_NET", "XDIT_CONTROL_NET")]),
    "ParallelControlNetApply": (
        ["strength", "start_percent", "end_percent", "union_type"],
        [("model", "XDIT_MODEL"), ("control_net", "XDIT_CONTROL_NET"), ("image", "IMAGE"), ("vae", "VAE")],
        [("XDIT_MODEL", "XDIT_MODEL")]),
    "ParallelConsisIDIdentity": (
        ["identity", "width", "height", "length", "batch_size"],
        [("model", "XDIT_MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("face_image", "IMAGE")],
        [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]),
}
UI_ONLY_WIDGETS = {"control_after_generate", "upload"}

LOADER = dict(model_name="flux1-dev.safetensors", weight_dtype="default", ulysses_degree=0, ring_degree=1,
              use_cfg_parallel=False, data_parallel_degree=1, pipefusion_parallel_degree=1, devices="auto",
              attention_backend="auto", compile=False)
SAMPLER = dict(seed=0, control_after_generate="randomize", steps=20, cfg=1.0, sampler_name="euler", scheduler="simple",
               denoise=1.0, shift="model default", max_shift=1.15, base_shift=0.5)


def text_to_image(extra_model_nodes: dict | None = None, latent: dict | None = None, denoise: float = 1.0) -> dict:
    """Flux txt2img, the stock workflow with the MODEL nodes and the decode swapped for ours."""
    graph = {
        "1": ("DualCLIPLoader", dict(clip_name1="t5xxl_fp16.safetensors", clip_name2="clip_l.safetensors", type="flux", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox in fresh snow, morning light, photograph"), {"clip": ("1", 0)}),
        "3": ("FluxGuidance", dict(guidance=3.5), {"conditioning": ("2", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptySD3LatentImage", dict(width=1024, height=1024, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER), {}),
        "7": ("ParallelSampler", dict(SAMPLER, denoise=denoise),
              {"model": ("6", 0), "positive": ("3", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="ae.safetensors"), {}),
        "9": ("ParallelVAEDecode", {}, {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveImage", dict(filename_prefix="xdit_flux"), {"images": ("9", 0)}),
    }
    graph.update(extra_model_nodes or {})
    if latent:
        graph.update(latent)
    return graph


def with_lora() -> dict:
    graph = text_to_image({"11": ("ParallelLoraLoader", dict(lora_name="flux_lora.safetensors", strength_model=1.0), {"model": ("6", 0)})})
    cls, widgets, links = graph["7"]
    graph["7"] = (cls, widgets, {**links, "model": ("11", 0)})
    return graph


def image_to_image() -> dict:
    graph = text_to_image(denoise=0.6)
    del graph["5"]
    graph["12"] = ("LoadImage", dict(image="example.png", upload="image"), {})
    graph["13"] = ("VAEEncode", {}, {"pixels": ("12", 0), "vae": ("8", 0)})
    cls, widgets, links = graph["7"]
    graph["7"] = (cls, widgets, {**links, "latent_image": ("13", 0)})
    return graph


def with_controlnet() -> dict:
    """Flux + an InstantX/Shakker-Labs ControlNet; the control image is VAE-encoded (hence the vae link)."""
    graph = text_to_image({
        "14": ("ParallelControlNetLoader", dict(control_net_name="flux_controlnet_union.safetensors"), {}),
        "15": ("LoadImage", dict(image="example.png", upload="image"), {}),
        "16": ("ParallelControlNetApply", dict(strength=0.7, start_percent=0.0, end_percent=0.8, union_type="auto"),
               {"model": ("6", 0), "control_net": ("14", 0), "image": ("15", 0), "vae": ("8", 0)}),
    })
    cls, widgets, links = graph["7"]
    graph["7"] = (cls, widgets, {**links, "model": ("16", 0)})
    return graph


def sd3_text_to_image() -> dict:
    """SD3.5 txt2img as ComfyUI's SD3 examples build it (TripleCLIPLoader, cfg 4.5, dpmpp_2m + sgm_uniform,
    28 steps), with the MODEL nodes and the decode swapped for ours. SD3 needs cfg, so the loader puts the
    conditional and unconditional branch on two worker groups and gives the rest of the devices to Ulysses."""
    return {
        "1": ("TripleCLIPLoader", dict(clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                                       clip_name3="t5xxl_fp16.safetensors"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox in fresh snow, morning light, photograph"), {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptySD3LatentImage", dict(width=1024, height=1024, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="checkpoints/sd3.5_medium.safetensors", use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=28, cfg=4.5, sampler_name="dpmpp_2m", scheduler="sgm_uniform"),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="sd3_vae.safetensors"), {}),
        "9": ("ParallelVAEDecode", {}, {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveImage", dict(filename_prefix="xdit_sd3"), {"images": ("9", 0)}),
    }


def pixart_text_to_image() -> dict:
    """PixArt-Sigma txt2img as ComfyUI's PixArt examples build it (T5-XXL through CLIPLoader type pixart, an
    SD latent, cfg 4.5), with the MODEL nodes swapped for ours. PixArt needs cfg, so the loader puts the
    conditional and unconditional branch on two worker groups. The decode is the stock VAEDecode (SDXL VAE):
    the patch-parallel decode is not offered for PixArt yet."""
    return {
        "1": ("CLIPLoader", dict(clip_name="t5xxl_fp16.safetensors", type="pixart", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox in fresh snow, morning light, photograph"), {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptyLatentImage", dict(width=1024, height=1024, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="PixArt-Sigma-XL-2-1024-MS.safetensors", use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=20, cfg=4.5, sampler_name="euler", scheduler="normal"),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="sdxl_vae.safetensors"), {}),
        "9": ("VAEDecode", {}, {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveImage", dict(filename_prefix="xdit_pixart"), {"images": ("9", 0)}),
    }


def wan_text_to_video() -> dict:
    """Wan 2.1 T2V 1.3B as ComfyUI's Wan example builds it (umt5-xxl via CLIPLoader type wan, 832x480, 33 frames,
    shift 8, cfg 6), with the MODEL nodes swapped for ours. Wan needs cfg, so the loader puts the conditional and
    unconditional branch on two worker groups and gives the rest of the devices to Ulysses. The Wan 3D VAE is not
    patch-parallel yet: the stock VAE Decode turns the video latent into frames, saved as an animated WebP."""
    return {
        "1": ("CLIPLoader", dict(clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox running through fresh snow, morning light, tracking shot"), {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text="blurry, low quality, static, overexposed, worst quality"), {"clip": ("1", 0)}),
        "5": ("EmptyHunyuanLatentVideo", dict(width=832, height=480, length=33, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="wan2.1_t2v_1.3B_fp16.safetensors", use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=30, cfg=6.0),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="wan_2.1_vae.safetensors"), {}),
        "9": ("VAEDecode", {}, {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveAnimatedWEBP", dict(filename_prefix="xdit_wan", fps=16.0, lossless=False, quality=90, method="default"),
               {"images": ("9", 0)}),
    }


def qwen_image_text_to_image() -> dict:
    """Qwen-Image txt2img as ComfyUI's Qwen-Image example builds it (Qwen2.5-VL 7B via CLIPLoader type qwen_image,
    1328x1328, euler / simple, cfg 2.5), with the MODEL nodes swapped for ours. It needs cfg, so the loader puts the
    conditional and unconditional branch on two worker groups and gives the rest of the devices to Ulysses. The
    example's ModelSamplingAuraFlow (shift 3.1) is a MODEL node, which our sampler does not take yet: it samples
    with the model's default ModelSamplingFlux shift 1.15, as stock KSampler without that node. The decode is the
    stock VAE Decode with the Wan 2.1 VAE."""
    return {
        "1": ("CLIPLoader", dict(clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox in fresh snow, morning light, a sign that reads \"xDiT\""), {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptySD3LatentImage", dict(width=1328, height=1328, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="qwen_image_fp8_e4m3fn.safetensors", use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=20, cfg=2.5),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="qwen_image_vae.safetensors"), {}),
        "9": ("VAEDecode", {}, {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveImage", dict(filename_prefix="xdit_qwen_image"), {"images": ("9", 0)}),
    }


def hunyuan_video_text_to_video() -> dict:
    """HunyuanVideo 1.0 T2V as ComfyUI's HunyuanVideo example builds it (llava-llama-3 + CLIP-L via DualCLIPLoader
    type hunyuan_video, FluxGuidance 6, 848x480, 73 frames, euler / simple, cfg 1, shift 7), with the MODEL nodes
    swapped for ours. The model is guidance-distilled: cfg 1 runs no negative branch (the empty prompt only fills
    the sampler's input), so every device goes to Ulysses. The 3D VAE is not patch-parallel yet: the stock tiled
    VAE decode turns the video latent into frames, saved as an animated WebP."""
    return {
        "1": ("DualCLIPLoader", dict(clip_name1="clip_l.safetensors", clip_name2="llava_llama3_fp8_scaled.safetensors",
                                     type="hunyuan_video", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox running through fresh snow, morning light, tracking shot"), {"clip": ("1", 0)}),
        "3": ("FluxGuidance", dict(guidance=6.0), {"conditioning": ("2", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptyHunyuanLatentVideo", dict(width=848, height=480, length=73, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="hunyuan_video_t2v_720p_bf16.safetensors"), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=20, cfg=1.0),
              {"model": ("6", 0), "positive": ("3", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="hunyuan_video_vae_bf16.safetensors"), {}),
        "9": ("VAEDecodeTiled", dict(tile_size=256, overlap=64, temporal_size=64, temporal_overlap=8),
              {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveAnimatedWEBP", dict(filename_prefix="xdit_hunyuan_video", fps=24.0, lossless=False, quality=90,
                                        method="default"), {"images": ("9", 0)}),
    }


def dit_class_to_image() -> dict:
    """DiT-XL-2-256 class-to-image as DiTPipeline runs it (class 207 golden retriever, cfg 4, 25 steps of the
    folder's scheduler; the sampler's sampler_name / scheduler do not apply). The diffusers folder sits in
    models/diffusion_models, and the loader picks its transformer's weights file (the folder's config.json and
    scheduler/ apply). The class label node gives the positive class and the null class as negative; cfg > 1 puts
    the two branches on two worker groups. The SD VAE (sd-vae-ft-ema) decodes through the stock nodes."""
    return {
        "2": ("ParallelClassLabel", dict(class_id=207), {}),
        "5": ("EmptyLatentImage", dict(width=256, height=256, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="DiT-XL-2-256/transformer/diffusion_pytorch_model.safetensors",
                                     use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=25, cfg=4.0),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("2", 1), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="sd-vae-ft-ema.safetensors"), {}),
        "9": ("VAEDecode", {}, {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveImage", dict(filename_prefix="xdit_dit"), {"images": ("9", 0)}),
    }


def cogvideox_text_to_video() -> dict:
    """CogVideoX-5b text-to-video as CogVideoXPipeline runs it (720x480, 49 frames, 50 steps of the folder's
    CogVideoXDPMScheduler, cfg 6 with CFG parallel; the sampler's sampler_name / scheduler do not apply). T5-XXL
    through CLIPLoader type sd3 (t5xxl alone gives its hidden states). The diffusers folder sits in
    models/diffusion_models; the loader picks a weights file of its transformer/, and Parallel Folder VAE Decode
    decodes with the folder's own vae/ (core ComfyUI has no CogVideoX VAE); frames saved at 8 fps as the pipeline's
    export does."""
    return {
        "1": ("CLIPLoader", dict(clip_name="t5xxl_fp16.safetensors", type="sd3", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox running through fresh snow, morning light, tracking shot"), {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptyHunyuanLatentVideo", dict(width=720, height=480, length=49, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="CogVideoX-5b/transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                                     use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=50, cfg=6.0),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "9": ("ParallelFolderVAEDecode", dict(tiled=True), {"samples": ("7", 0), "model": ("6", 0)}),
        "10": ("SaveAnimatedWEBP", dict(filename_prefix="xdit_cogvideox", fps=8.0, lossless=False, quality=90, method="default"),
               {"images": ("9", 0)}),
    }


def mochi_text_to_video() -> dict:
    """Mochi 1 preview T2V as ComfyUI's Mochi example builds it (T5-XXL via CLIPLoader type mochi, EmptyMochiLatentVideo
    848x480, 37 frames, euler / simple, 30 steps, cfg 4.5), with the MODEL nodes swapped for ours. Mochi needs cfg,
    so the loader puts the conditional and unconditional branch on two worker groups and gives the rest of the
    devices to Ulysses. The Mochi VAE is not patch-parallel yet: the stock VAE Decode turns the 12-channel video
    latent into frames, saved as an animated WebP."""
    return {
        "1": ("CLIPLoader", dict(clip_name="t5xxl_fp16.safetensors", type="mochi", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox running through fresh snow, morning light, tracking shot"), {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptyMochiLatentVideo", dict(width=848, height=480, length=37, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="mochi_preview_bf16.safetensors", use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=30, cfg=4.5),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "8": ("VAELoader", dict(vae_name="mochi_vae.safetensors"), {}),
        "9": ("VAEDecode", {}, {"samples": ("7", 0), "vae": ("8", 0)}),
        "10": ("SaveAnimatedWEBP", dict(filename_prefix="xdit_mochi", fps=24.0, lossless=False, quality=90, method="default"),
               {"images": ("9", 0)}),
    }


def hunyuan_dit_text_to_image() -> dict:
    """HunyuanDiT v1.2 txt2img as ComfyUI's HunyuanDiT example builds it (the all-in-one checkpoint's BERT + mT5-XL
    CLIP and SDXL-format VAE from CheckpointLoaderSimple, 1024x1024, cfg 6, euler / sgm_uniform), with the MODEL
    nodes swapped for ours: the stock loader's MODEL output stays unused (ComfyUI loads the DiT only when a sampler
    asks). HunyuanDiT needs cfg, so the loader puts the two branches on two worker groups; the decode is stock."""
    return {
        "1": ("CheckpointLoaderSimple", dict(ckpt_name="hunyuan_dit_1.2.safetensors"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox in fresh snow, morning light, photograph"), {"clip": ("1", 1)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 1)}),
        "5": ("EmptyLatentImage", dict(width=1024, height=1024, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="checkpoints/hunyuan_dit_1.2.safetensors", use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=40, cfg=6.0, sampler_name="euler", scheduler="sgm_uniform"),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "9": ("VAEDecode", {}, {"samples": ("7", 0), "vae": ("1", 2)}),
        "10": ("SaveImage", dict(filename_prefix="xdit_hunyuan_dit"), {"images": ("9", 0)}),
    }


def consisid_text_to_video() -> dict:
    """ConsisID-preview identity-preserving text-to-video as ConsisIDPipeline's example runs it (720x480, 49
    frames, 50 steps of the folder's CogVideoXDPMScheduler, cfg 6 with CFG parallel). T5-XXL through CLIPLoader
    type sd3; the face: the aligned crop process_face_embeddings_infer returned (LoadImage) and its identity file
    in models/consisid_identity (README, ConsisID); Parallel ConsisID Identity encodes the face with the folder's
    vae/ and makes the video latent; Parallel Folder VAE Decode decodes with the same vae/."""
    return {
        "1": ("CLIPLoader", dict(clip_name="t5xxl_fp16.safetensors", type="sd3", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a woman walking along a city street at dusk, smiling, cinematic, 35mm film"),
              {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("LoadImage", dict(image="face.png", upload="image"), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="ConsisID-preview/transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                                     use_cfg_parallel=True), {}),
        "3": ("ParallelConsisIDIdentity", dict(identity="face.safetensors", width=720, height=480, length=49, batch_size=1),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "face_image": ("5", 0)}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=50, cfg=6.0),
              {"model": ("6", 0), "positive": ("3", 0), "negative": ("3", 1), "latent_image": ("3", 2)}),
        "9": ("ParallelFolderVAEDecode", dict(tiled=True), {"samples": ("7", 0), "model": ("6", 0)}),
        "10": ("SaveAnimatedWEBP", dict(filename_prefix="xdit_consisid", fps=8.0, lossless=False, quality=90, method="default"),
               {"images": ("9", 0)}),
    }


def latte_text_to_video() -> dict:
    """Latte-1 text-to-video as LattePipeline runs it (512x512, 16 frames, 50 steps of the folder's DDIMScheduler,
    cfg 7.5 with CFG parallel; the sampler's sampler_name / scheduler do not apply). T5-XXL through CLIPLoader type
    sd3 (t5xxl alone gives its hidden states). EmptyHunyuanLatentVideo's length 61 gives Latte's 16 latent frames
    (one per video frame; the all-zero 16 channels become Latte's 4). The diffusers folder sits in
    models/diffusion_models; Parallel Folder VAE Decode decodes the frames with the folder's own vae/ (the SD VAE),
    saved at 8 fps."""
    return {
        "1": ("CLIPLoader", dict(clip_name="t5xxl_fp16.safetensors", type="sd3", device="default"), {}),
        "2": ("CLIPTextEncode", dict(text="a red fox running through fresh snow, morning light, tracking shot"), {"clip": ("1", 0)}),
        "4": ("CLIPTextEncode", dict(text=""), {"clip": ("1", 0)}),
        "5": ("EmptyHunyuanLatentVideo", dict(width=512, height=512, length=61, batch_size=1), {}),
        "6": ("ParallelLoader", dict(LOADER, model_name="Latte-1/transformer/diffusion_pytorch_model.safetensors",
                                     use_cfg_parallel=True), {}),
        "7": ("ParallelSampler", dict(SAMPLER, steps=50, cfg=7.5),
              {"model": ("6", 0), "positive": ("2", 0), "negative": ("4", 0), "latent_image": ("5", 0)}),
        "9": ("ParallelFolderVAEDecode", dict(tiled=True), {"samples": ("7", 0), "model": ("6", 0)}),
        "10": ("SaveAnimatedWEBP", dict(filename_prefix="xdit_latte", fps=8.0, lossless=False, quality=90, method="default"),
               {"images": ("9", 0)}),
    }

WORKFLOWS = {
    "flux_txt2img_parallel": text_to_image(),
    "flux_lora_parallel": with_lora(),
    "flux_img2img_parallel": image_to_image(),
    "flux_controlnet_parallel": with_controlnet(),
    "sd3_txt2img_parallel": sd3_text_to_image(),
    "pixart_txt2img_parallel": pixart_text_to_image(),
    "wan_txt2video_parallel": wan_text_to_video(),
    "qwen_image_txt2img_parallel": qwen_image_text_to_image(),
    "hunyuan_video_txt2video_parallel": hunyuan_video_text_to_video(),
    "dit_class2img_parallel": dit_class_to_image(),
    "cogvideox_txt2video_parallel": cogvideox_text_to_video(),
    "mochi_txt2video_parallel": mochi_text_to_video(),
    "hunyuan_dit_txt2img_parallel": hunyuan_dit_text_to_image(),
    "consisid_txt2video_parallel": consisid_text_to_video(),
    "latte_txt2video_parallel": latte_text_to_video(),
}


def to_api(graph: dict) -> dict:
    api = {}
    for node_id, (cls, widgets, links) in graph.items():
        inputs = {k: v for k, v in widgets.items() if k not in UI_ONLY_WIDGETS}
        inputs.update({name: [src, slot] for name, (src, slot) in links.items()})
        api[node_id] = {"class_type": cls, "inputs": inputs, "_meta": {"title": cls}}
    return api


def to_ui(graph: dict) -> dict:
    links, nodes = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id, (cls, _, node_links) in graph.items():
        for name, (src, slot) in node_links.items():
            link_id = len(links) + 1
            in_type = dict(NODE_TYPES[cls][1])[name]
            links.append([link_id, int(src), slot, int(node_id), [n for n, _ in NODE_TYPES[cls][1]].index(name), in_type])
            outgoing.setdefault((src, slot), []).append(link_id)
    by_target = {(l[3], l[4]): l[0] for l in links}
    for order, (node_id, (cls, widgets, _)) in enumerate(graph.items()):
        widget_names, inputs, outputs = NODE_TYPES[cls]
        column, row = divmod(order, 3)
        # Room for every widget and input slot (about 26 px each), so nothing draws under a neighbour.
        height = 46 + 26 * (len(widget_names) + max(len(inputs), len(outputs)))
        nodes.append({
            "id": int(node_id), "type": cls, "pos": [60 + 380 * column, 60 + 400 * row], "size": [340, height],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": by_target.get((int(node_id), i))} for i, (n, t) in enumerate(inputs)],
            "outputs": [{"name": n, "type": t, "links": outgoing.get((node_id, i), []), "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": cls},
            "widgets_values": [widgets[name] for name in widget_names],
        })
    return {"last_node_id": max(int(n) for n in graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    (ROOT / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    for name, graph in WORKFLOWS.items():
        (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(to_ui(graph), indent=1) + "\n")
        (ROOT / "workflows" / "api" / f"{name}.json").write_text(json.dumps(to_api(graph), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
