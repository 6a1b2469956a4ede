"""The family registry: the README's model table is generated from it, and every entry is whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_xdit.sampling.samplers import is_flow

from comfy_xdit.models import families

ROOT = Path(__file__).resolve().parent.parent


def test_readme_model_table_is_generated_from_the_registry():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_model_table.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert families.markdown_table() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_every_family_entry_is_complete(name):
    family = families.get(name)
    assert family.name == name
    assert set(family.methods) <= set(families.METHODS)
    assert family.latent.channels == len(family.latent.rgb_factors)
    # Every stock text encoder puts pooled_output on the conditioning (None for Wan's umt5): used or ignored.
    assert "pooled_output" in family.conditioning_keys | family.ignored_keys
    assert ("vae" in family.methods) != bool(family.vae_note), f"{name}: say how its latents decode without ParallelVAEDecode"
    assert family.semantics in ("comfyui", "diffusers")
    if family.semantics == "diffusers":  # its diffusers pipeline's loop, not a ComfyUI model sampling
        assert family.pipeline is not None and family.sampling(1.0) is None
        return
    sampling = family.sampling(1.0)
    if is_flow(sampling):
        assert float(sampling.table[-1]) == pytest.approx(1.0)
    else:  # a DDPM table: sigma grows far past 1
        assert float(sampling.table[0]) < 0.1 < 10 < float(sampling.table[-1])


def test_sd3_latent_format_is_comfyuis():
    # comfy/latent_formats.py SD3: scale_factor 1.5305, shift_factor 0.0609.
    assert (families.SD3.latent.scale, families.SD3.latent.shift) == (1.5305, 0.0609)
    assert (families.FLUX.latent.scale, families.FLUX.latent.shift) == (0.3611, 0.1159)


def test_pixart_latent_formats_are_comfyuis():
    # comfy/supported_models.py: PixArtAlpha uses SD15 (0.18215), PixArtSigma SDXL (0.13025).
    assert families.PIXART.latent_format({"use_additional_conditions": True}).scale == 0.18215
    assert families.PIXART.latent_format({"use_additional_conditions": False}).scale == 0.13025
    assert families.PIXART.latent_format({"use_additional_conditions": None, "sample_size": 128}).scale == 0.18215
def test_wan_latent_format_and_sampling_are_comfyuis():
    # comfy/latent_formats.py Wan21 (per-channel mean/std, 3 latent dimensions); WAN21_T2V: shift 8.
    latent = families.WAN.latent
    assert (latent.channels, latent.dimensions, latent.scale) == (16, 3, 1.0)
    assert latent.channel_mean[:2] == (-0.7571, -0.7089) and latent.channel_std[-1] == 1.9160
    assert families.WAN.default_shift(None) == 8.0 and families.WAN.sampling(8.0).multiplier == 1000.0


def test_qwen_image_latent_format_and_sampling_are_comfyuis():
    # comfy/supported_models.py QwenImage: latent_formats.Wan21, a FLUX-type model (ModelSamplingFlux), shift 1.15.
    from comfy_xdit.bridge import check_latent
    from comfy_xdit.sampling.schedules import FlowSampling

    assert families.QWEN_IMAGE.latent == families.WAN.latent
    assert families.QWEN_IMAGE.default_shift(None) == 1.15 and families.QWEN_IMAGE.sampling(1.15) == FlowSampling(1.15)
    check_latent({"samples": torch.zeros(1, 16, 6, 8)}, families.QWEN_IMAGE)
    check_latent({"samples": torch.zeros(1, 16, 1, 6, 8)}, families.QWEN_IMAGE)
    with pytest.raises(ValueError, match="Qwen-Image text-to-image makes single images, but the latent has 3 frames"):
        check_latent({"samples": torch.zeros(1, 16, 3, 6, 8)}, families.QWEN_IMAGE)


def test_hunyuan_video_latent_format_sampling_and_conditioning_are_comfyuis():
    # comfy/latent_formats.py HunyuanVideo: scale 0.476986, 3 latent dimensions; supported_models.py
    # HunyuanVideo: shift 7 (a FLOW model: ModelSamplingDiscreteFlow, timestep = sigma x 1000);
    # model_base.HunyuanVideo: guidance 6.0 when the conditioning has none.
    from comfy_xdit.bridge import hunyuan_video_conditioning

    family = families.HUNYUAN_VIDEO
    assert (family.latent.channels, family.latent.dimensions, family.latent.scale, family.latent.shift) == (16, 3, 0.476986, 0.0)
    assert family.default_shift(None) == 7.0 and family.sampling(7.0).multiplier == 1000.0
    tokens, pooled = torch.randn(1, 5, 8), torch.randn(1, 768)
    cond = hunyuan_video_conditioning([[tokens, {"pooled_output": pooled}]], "positive")
    assert torch.equal(cond.context, tokens) and torch.equal(cond.pooled, pooled) and cond.guidance == 6.0
    cond = hunyuan_video_conditioning([[tokens, {"pooled_output": pooled, "guidance": 3.5,
                                                 "attention_mask": torch.ones(1, 5, dtype=torch.long)}]], "positive")
    assert cond.guidance == 3.5
    padded = torch.tensor([[1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="positive: the conditioning's attention mask hides 2 padded text tokens"):
        hunyuan_video_conditioning([[tokens, {"pooled_output": pooled, "attention_mask": padded}]], "positive")
    with pytest.raises(ValueError, match="negative: the conditioning has no pooled output; HunyuanVideo .* \\(DualCLIPLoader, type hunyuan_video\\)"):
        hunyuan_video_conditioning([[tokens, {"pooled_output": None}]], "negative")


def test_an_unknown_family_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="model family 'lumina2' is not supported; supported: flux, sd3, pixart"):
        families.get("lumina2")


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_the_cache_column_says_what_the_step_cache_accepts(name):
    from comfy_xdit.caching.job import SUPPORTED

    assert ("cache" in families.get(name).methods) == bool(SUPPORTED.get(name)), (
        f"{name}: the registry's 'cache' method and caching.job.SUPPORTED disagree")
