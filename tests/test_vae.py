"""VAE decode (plain and distvae patch-parallel) equals stock ComfyUI's VAEDecode.

The reference is ComfyUI 0.3.75 itself, run in a subprocess on the CPU: ``VAE(sd=...)`` from a
random full-width Flux VAE file (stock ComfyUI builds only full-width LDM VAEs, see
tests/vae_files.py), ``.decode(latent)`` for each latent. The engine decodes from the state dict
ComfyUI's ``first_stage_model`` then holds (what the bridge sends the pool), from the file, and
on 2 gloo processes with distvae. DESIGN.md: at most 1e-4 absolute on [0, 1] images.

Latents: 6x4 (even split), batch 2 of 5x4 (odd rows: bands of 3 and 2), and 1x4 (fewer rows than
ranks: the plain-decode fallback). Small, because stock ComfyUI insists on the full-width VAE.
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit import vae
from comfy_xdit.loading.safetensors_files import CheckpointError
from distributed import run_on_ranks
from vae_files import FLUX_VAE, comfyui_decode, comfyui_root, ldm_decoder_shapes, make_ldm_vae_state_dict

TOLERANCE = 1e-4  # DESIGN.md: ParallelVAEDecode against stock VAEDecode, absolute, [0, 1] images
LATENT_SHAPES = [(1, 16, 6, 4), (2, 16, 5, 4), (1, 16, 1, 4)]


def latents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) for shape in LATENT_SHAPES]


@pytest.fixture(scope="module")
def flux_vae(tmp_path_factory):
    """A random full-width Flux VAE file and stock ComfyUI's decode of latents() with it."""
    if comfyui_root() is None:
        pytest.skip("pristine ComfyUI not found in .comfyui/ComfyUI (tools/setup.sh puts it there)")
    work = tmp_path_factory.mktemp("flux_vae")
    path = work / "ae.safetensors"
    save_file(make_ldm_vae_state_dict(seed=0, **FLUX_VAE), path)
    reference = comfyui_decode(path, latents(), work)
    assert reference["vae_dtype"] == "torch.float32"
    for image in reference["images"]:
        # The random weights must give an image, not a clamped block, or the check is empty.
        inside = ((image > 0) & (image < 1)).float().mean()
        assert inside > 0.5, f"only {inside:.0%} of the reference pixels are inside (0, 1)"
    return path, reference


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def test_bridge_state_dict_decodes_as_comfyui(flux_vae):
    _, reference = flux_vae
    # first_stage_model.state_dict(): LDM layout, encoder keys included (and ignored).
    state_dict = reference["state_dict"]
    assert any(k.startswith("encoder.") for k in state_dict)
    assert set(vae.decoder_state_dict(state_dict)) == {k for k in state_dict if k.startswith("decoder.")}
    # The helper's key list is exactly ComfyUI's Flux decoder (so the file test means something).
    decoder_shapes = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith("decoder.")}
    assert decoder_shapes == ldm_decoder_shapes(**FLUX_VAE)
    decoder = vae.build_decoder(state_dict)
    assert decoder.config == vae.VAEConfig(16, (128, 256, 512, 512), 2, 3, mid_attention=True, post_quant_conv=False)
    assert decoder.dtype == torch.float32
    for latent, expected in zip(latents(), reference["images"]):
        image = decoder.decode(latent)
        assert image.shape == (latent.shape[0], latent.shape[2] * 8, latent.shape[3] * 8, 3)
        diff = max_diff(image, expected)
        print(f"1 rank, bridge state dict, latent {tuple(latent.shape)}: max abs diff {diff:.2e}")
        assert diff <= TOLERANCE
    # Batch decoded at once: the same images.
    latent = latents()[1]
    assert max_diff(decoder.decode(latent, batch_size=None), reference["images"][1]) <= TOLERANCE


def test_file_decodes_as_comfyui(flux_vae, tmp_path):
    path, reference = flux_vae
    decoder = vae.load_vae_decoder(path)
    for latent, expected in zip(latents()[:2], reference["images"]):
        assert max_diff(decoder.decode(latent), expected) <= TOLERANCE
    # The file and the state dict ComfyUI built from it are one VAE to the cache.
    from_file = vae.read_vae_state_dict(path)
    assert vae.state_dict_fingerprint(from_file) == vae.state_dict_fingerprint(reference["state_dict"])


def _decode_on_ranks(path: str) -> tuple[list[torch.Tensor], bool]:
    decoder = vae.load_vae_decoder(path)
    images = [decoder.decode_parallel(latent) for latent in latents()]
    used_distvae = bool(decoder._parallel)
    # distvae rebuilt a twin, not our decoder: the plain decode still works, sharing the weights.
    twin = next(iter(decoder._parallel.values())) if used_distvae else None
    if twin is not None:
        assert twin.decoder.conv_in.weight.data_ptr() == decoder.decoder.conv_in.weight.data_ptr()
        assert max_diff(decoder.decode(latents()[0]), images[0]) <= TOLERANCE
    return images, used_distvae


def test_two_ranks_decode_as_comfyui(flux_vae):
    pytest.importorskip("distvae")
    path, reference = flux_vae
    results = run_on_ranks(2, _decode_on_ranks, str(path))
    for rank, (images, used_distvae) in enumerate(results):
        assert used_distvae, "the row split never ran"
        for latent, image, expected in zip(latents(), images, reference["images"]):
            diff = max_diff(image, expected)
            print(f"2 ranks (rank {rank}), latent {tuple(latent.shape)}: max abs diff {diff:.2e}")
            assert diff <= TOLERANCE
    for a, b in zip(*(images for images, _ in results)):
        assert torch.equal(a, b), "ranks returned different images"


# --- engine-only checks on tiny widths (no ComfyUI needed) ------------------------------------


def tiny_diffusers_vae(**kwargs):
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=False, use_post_quant_conv=False,
    ) | kwargs
    model = AutoencoderKL(**config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if param.ndim > 1:
                param.copy_(noise / (param[0].numel()) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model


def diffusers_decode(model, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = model.decode(latent).sample
    return torch.clamp((x + 1) / 2, 0, 1).movedim(1, -1)


@pytest.mark.parametrize("post_quant_conv", [False, True], ids=["flux-like", "sd-like"])
@pytest.mark.parametrize("prefix", ["", "vae."])
def test_diffusers_layout_decodes_as_diffusers(post_quant_conv, prefix):
    latent_channels = 4 if post_quant_conv else 16
    model = tiny_diffusers_vae(latent_channels=latent_channels, use_post_quant_conv=post_quant_conv)
    state_dict = {prefix + k: v for k, v in model.state_dict().items()}
    decoder = vae.build_decoder(state_dict)
    assert decoder.config == vae.VAEConfig(latent_channels, (32, 64), 1, 3, True, post_quant_conv)
    latent = torch.randn(2, latent_channels, 3, 5, generator=torch.Generator().manual_seed(2))
    assert max_diff(decoder.decode(latent), diffusers_decode(model, latent)) <= 1e-5


def test_ldm_layout_config_and_prefixes(tmp_path):
    config = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16)
    state_dict = make_ldm_vae_state_dict(**config)
    expected = vae.VAEConfig(16, (32, 64, 64), 1, 3, mid_attention=True, post_quant_conv=False)
    assert vae.infer_vae_config(state_dict) == expected
    latent = torch.randn(1, 16, 4, 3, generator=torch.Generator().manual_seed(3))
    plain = vae.build_decoder(state_dict).decode(latent)
    assert plain.shape == (1, 16, 12, 3)
    # A whole checkpoint with the VAE under first_stage_model. and other models beside it.
    checkpoint = {"first_stage_model." + k: v for k, v in state_dict.items()}
    checkpoint["model.diffusion_model.x.weight"] = torch.zeros(2)
    checkpoint["first_stage_model.encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    save_file(checkpoint, tmp_path / "checkpoint.safetensors")
    read = vae.read_vae_state_dict(tmp_path / "checkpoint.safetensors")
    assert set(read) == set(state_dict)
    assert torch.equal(vae.load_vae_decoder(tmp_path / "checkpoint.safetensors").decode(latent), plain)
    assert vae.state_dict_fingerprint(checkpoint) == vae.state_dict_fingerprint(state_dict)
    changed = dict(state_dict)
    changed["decoder.conv_out.bias"] = changed["decoder.conv_out.bias"] + 1e-3
    assert vae.state_dict_fingerprint(changed) != vae.state_dict_fingerprint(state_dict)
    # bfloat16 weights decode in bfloat16 unless told otherwise; the image is float32.
    bf16 = vae.build_decoder({k: v.bfloat16() for k, v in state_dict.items()})
    assert bf16.dtype == torch.bfloat16 and bf16.decode(latent).dtype == torch.float32
    assert vae.build_decoder(state_dict, dtype="bfloat16").dtype == torch.bfloat16


def test_refusals(tmp_path):
    tiny = make_ldm_vae_state_dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16)
    with pytest.raises(vae.VAEError, match="temporal"):
        vae.build_decoder(tiny | {"decoder.mid.block_1.mix_factor": torch.zeros(1)})
    with pytest.raises(vae.VAEError, match="batch-norm"):
        vae.build_decoder(tiny | {"bn.running_mean": torch.zeros(64)})
    with pytest.raises(vae.VAEError, match="video"):
        vae.build_decoder(tiny | {"decoder.conv_in.weight": torch.zeros(64, 16, 3, 3, 3)})
    with pytest.raises(vae.VAEError, match="no VAE decoder"):
        vae.build_decoder({"model.diffusion_model.img_in.weight": torch.zeros(2, 2)})
    with pytest.raises(vae.VAEError, match="attention inside"):
        vae.build_decoder(tiny | {"decoder.up.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(vae.VAEError, match=r"expected \[B, 16, h, w\]"):
        vae.build_decoder(tiny).decode(torch.zeros(1, 4, 2, 2))
    (tmp_path / "ae.ckpt").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        vae.read_vae_state_dict(tmp_path / "ae.ckpt")
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "encoder_only.safetensors")
    with pytest.raises(CheckpointError, match="no VAE decoder"):
        vae.read_vae_state_dict(tmp_path / "encoder_only.safetensors")

