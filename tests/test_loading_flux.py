"""Offline Flux.1 checkpoint loading: every format users have, and the refusals.

Tiny random models (1 double + 1 single block, 2 heads of 16) written at test time; each format
must load to exactly the same tensors, and the loaded model must compute what the original does
(which guards the config inferred from shapes).
"""

from __future__ import annotations

import socket

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from checkpoints import (
    COMFY_PREFIX,
    diffusers_to_bfl_state_dict,
    make_flux_diffusers_model,
    write_bfl_file,
    write_diffusers_file,
    write_diffusers_folder,
    write_sd15_unet_like_file,
    write_vae_like_file,
)
from comfy_xdit.loading import (
    CheckpointError,
    bfl_to_diffusers_rules,
    flux_axes_dims_rope,
    load_flux_transformer,
    open_flux_checkpoint,
    read_flux_config,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach a hub (or anything else) fails the test loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def model():
    return make_flux_diffusers_model(num_layers=1, num_single_layers=1, heads=2, head_dim=16, guidance=True, seed=0)


@pytest.fixture(scope="module")
def formats(model, tmp_path_factory):
    """The same model in every supported format: name -> path to give the loader."""
    root = tmp_path_factory.mktemp("flux")
    return {
        "diffusers_folder": write_diffusers_folder(model, root / "folder"),
        "sharded_folder": write_diffusers_folder(model, root / "sharded", max_shard_size="20KB"),
        "pipeline_folder": write_diffusers_folder(model, root / "pipeline", pipeline=True),
        "bfl": write_bfl_file(model, root / "flux_bfl.safetensors"),
        "bfl_comfy_prefix": write_bfl_file(model, root / "flux_comfy.safetensors", prefix=COMFY_PREFIX),
        "diffusers_file": write_diffusers_file(model, root / "flux_diffusers.safetensors"),
    }


def expected_config(model) -> dict:
    c = model.config
    return {
        "patch_size": 1,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "num_layers": c.num_layers,
        "num_single_layers": c.num_single_layers,
        "attention_head_dim": c.attention_head_dim,
        "num_attention_heads": c.num_attention_heads,
        "joint_attention_dim": c.joint_attention_dim,
        "pooled_projection_dim": c.pooled_projection_dim,
        "guidance_embeds": c.guidance_embeds,
        "axes_dims_rope": tuple(c.axes_dims_rope),
    }


def flux_inputs(model, batch=2, height=4, width=6, text=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return dict(
        hidden_states=torch.randn(batch, height * width, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
        guidance=torch.full((batch,), 3.5) if c.guidance_embeds else None,
        return_dict=False,
    )


def assert_same_tensors(loaded: dict, reference: dict) -> None:
    assert sorted(loaded) == sorted(reference)
    for key, tensor in reference.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


# --- every format loads to the same weights ------------------------------------------------


@pytest.mark.parametrize(
    "name", ["diffusers_folder", "sharded_folder", "pipeline_folder", "bfl", "bfl_comfy_prefix", "diffusers_file"]
)
def test_every_format_loads_the_same_weights(name, model, formats):
    assert read_flux_config(formats[name]) == expected_config(model)
    loaded = load_flux_transformer(formats[name], dtype=torch.float32)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    reference = load_flux_transformer(formats["diffusers_folder"], dtype=torch.bfloat16).state_dict()
    assert_same_tensors(load_flux_transformer(formats[name], dtype=torch.bfloat16).state_dict(), reference)


def test_sharded_folder_really_has_shards(formats):
    folder = formats["sharded_folder"]
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("name", ["bfl_comfy_prefix", "diffusers_folder"])
def test_loaded_model_computes_what_the_original_does(name, model, formats):
    loaded = load_flux_transformer(formats[name], dtype=torch.float32)
    inputs = flux_inputs(model)
    with torch.no_grad():
        (want,) = model(**inputs)
        (got,) = loaded(**inputs)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_layers=2, num_single_layers=3, heads=3, head_dim=8, guidance=False),  # schnell-like
        dict(num_layers=1, num_single_layers=0, heads=2, head_dim=32, in_channels=96, out_channels=16),  # Fill-like
    ],
)
def test_config_inference_on_other_shapes(options, tmp_path):
    other = make_flux_diffusers_model(seed=3, **options)
    path = write_bfl_file(other, tmp_path / "other.safetensors", prefix=COMFY_PREFIX)
    assert read_flux_config(path) == expected_config(other)
    loaded = load_flux_transformer(path, dtype=torch.float32)
    inputs = flux_inputs(other, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], other(**inputs)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, "bf16", "fp16"])
def test_dtypes(dtype, model, formats):
    loaded = load_flux_transformer(formats["bfl"], dtype=dtype)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, dtype)
    assert {p.dtype for p in loaded.parameters()} == {want}


def test_unsupported_dtype_refused(formats):
    with pytest.raises(ValueError, match="not supported"):
        load_flux_transformer(formats["bfl"], dtype=torch.int8)


def test_scaled_fp8_file_is_upcast_and_scaled(model, tmp_path):
    path = write_bfl_file(model, tmp_path / "flux_fp8_scaled.safetensors", prefix=COMFY_PREFIX, scaled_fp8=True)
    loaded = load_flux_transformer(path, dtype=torch.float32).state_dict()
    for key, want in model.state_dict().items():
        got = loaded[key]
        # float8_e4m3fn keeps 3 mantissa bits: at most 1/16 relative error per element
        assert (got - want).abs().max() <= want.abs().max() / 16 + 1e-6, key


def test_plain_fp8_file_is_upcast(model, tmp_path):
    path = write_bfl_file(model, tmp_path / "flux_fp8.safetensors", dtype=torch.float8_e4m3fn)
    loaded = load_flux_transformer(path, dtype=torch.bfloat16).state_dict()
    for key, want in model.state_dict().items():
        assert torch.equal(loaded[key], want.to(torch.float8_e4m3fn).float().to(torch.bfloat16)), key


def test_subset_of_blocks_reads_only_those(formats):
    with open_flux_checkpoint(formats["bfl_comfy_prefix"]) as checkpoint:
        read = []
        get = checkpoint.source.get
        checkpoint.source.get = lambda key: read.append(key) or get(key)
        part = checkpoint.state_dict(dtype=torch.float32, include=lambda k: k.startswith("single_transformer_blocks.0."))
    assert part and all(k.startswith("single_transformer_blocks.0.") for k in part)
    assert "single_transformer_blocks.0.attn.to_q.weight" in part
    assert read and all(k.startswith(COMFY_PREFIX + "single_blocks.0.") for k in read)


# --- the key table agrees with diffusers' own converter -------------------------------------


def test_bfl_tables_match_diffusers_converter():
    """At Flux's real width (3072, the only one diffusers' converter knows), with thin tensors.

    The converter only splits and swaps along dim 0, so each tensor is given its real first
    dimension and a second dimension of 1: cheap, yet every split size is the real one.
    """
    from comfy_xdit.loading.flux import _meta_model

    config = {
        "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 128, "num_attention_heads": 24,
        "in_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    }
    g = torch.Generator().manual_seed(0)
    diffusers_sd = {
        k: torch.randn((v.shape[0],) + ((1,) if v.ndim > 1 else ()), generator=g)
        for k, v in _meta_model(config).state_dict().items()
    }
    bfl_sd = diffusers_to_bfl_state_dict(diffusers_sd)
    # 1. the test helpers' inverse is the inverse of diffusers' converter
    theirs = convert_flux_transformer_checkpoint_to_diffusers({COMFY_PREFIX + k: v for k, v in bfl_sd.items()})
    assert_same_tensors(theirs, diffusers_sd)
    # 2. the loader's table does what diffusers' converter does
    ours = {}
    for rule in bfl_to_diffusers_rules(config):
        ours.update(rule.apply(bfl_sd[rule.source]))
    assert_same_tensors(ours, diffusers_sd)


def test_axes_dims_rope():
    assert flux_axes_dims_rope(128) == (16, 56, 56)
    for head_dim in range(6, 258, 2):
        axes = flux_axes_dims_rope(head_dim)
        assert sum(axes) == head_dim and all(a >= 2 and a % 2 == 0 for a in axes), (head_dim, axes)
    assert flux_axes_dims_rope(16) == (4, 6, 6)
    with pytest.raises(CheckpointError):
        flux_axes_dims_rope(15)


# --- refusals ----------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "flux1-dev.safetensors"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_flux_transformer(path)
    assert str(path) in str(info.value)


def test_truncated_file_refused(formats, tmp_path):
    data = formats["bfl"].read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file") as info:
        read_flux_config(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="truncated"):
        load_flux_transformer(path)


def test_non_safetensors_bytes_refused(tmp_path):
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file") as info:
        load_flux_transformer(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_refused_unopened(suffix, tmp_path, monkeypatch):
    path = tmp_path / f"flux{suffix}"
    torch.save({"img_in.weight": torch.zeros(1)}, path)
    # Nothing may unpickle it, not even to look.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match="only .safetensors files are read; pickle-based checkpoints are refused"):
        load_flux_transformer(path)


def test_pickle_only_folder_refused(tmp_path):
    torch.save({}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle-based checkpoints are refused"):
        load_flux_transformer(tmp_path)


@pytest.mark.parametrize("writer", [write_sd15_unet_like_file, write_vae_like_file])
def test_other_families_refused(writer, tmp_path):
    path = writer(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a Flux.1 transformer checkpoint: no double_blocks/transformer_blocks keys found") as info:
        load_flux_transformer(path)
    assert str(path) in str(info.value)


def test_other_dit_with_blocks_refused(tmp_path):
    # SD3-like diffusers keys: transformer_blocks but no Flux.1 embedders.
    path = tmp_path / "sd3_like.safetensors"
    save_file({"pos_embed.proj.weight": torch.zeros(4, 16, 2, 2), "transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="not a Flux.1 transformer checkpoint"):
        read_flux_config(path)


def test_missing_and_unexpected_keys_refused(model, tmp_path):
    sd = diffusers_to_bfl_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    del sd["double_blocks.0.txt_mlp.2.bias"]
    sd["double_blocks.0.lora_up.weight"] = torch.zeros(2, 2)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        read_flux_config(path)
    message = str(info.value)
    assert "missing keys" in message and "double_blocks.0.txt_mlp.2.bias" in message
    assert "unexpected keys" in message and "double_blocks.0.lora_up.weight" in message


def test_wrong_shape_refused(model, tmp_path):
    sd = diffusers_to_bfl_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    sd["double_blocks.0.img_mlp.0.weight"] = torch.zeros(48, 32)  # MLP ratio 1.5, not Flux.1's 4
    path = tmp_path / "odd_mlp.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="double_blocks.0.img_mlp.0.weight.*has shape"):
        read_flux_config(path)


def test_folder_config_contradicting_weights_refused(model, tmp_path):
    import json

    folder = write_diffusers_folder(model, tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = 19
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_layers"):
        read_flux_config(folder)


def test_comfy_all_in_one_checkpoint_ignores_other_components(model, tmp_path):
    # ComfyUI "checkpoints" files carry the VAE and text encoders beside model.diffusion_model.
    extra = {"vae.decoder.conv_in.weight": torch.zeros(2, 2), "text_encoders.t5xxl.x.weight": torch.zeros(2)}
    path = write_bfl_file(model, tmp_path / "aio.safetensors", prefix=COMFY_PREFIX, extra=extra)
    loaded = load_flux_transformer(path, dtype=torch.float32)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
