"""LoRAs on a loaded Flux: every common file layout, exact restore, ComfyUI's arithmetic.

Tiny random Flux models and random LoRA files written at test time (tests/lora_files.py). The
comparison with ComfyUI runs its own loader and patcher (comfy.sd.load_diffusion_model_state_dict,
comfy.sd.load_lora_for_models as LoraLoaderModelOnly calls it, ModelPatcher.patch_model) from the
pristine source in ``<repo>/.comfyui/ComfyUI`` (skipped when missing) on the same files.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import make_flux_diffusers_model, write_bfl_file
from lora_files import (
    random_flux_lora,
    write_bfl_lora,
    write_kohya_lora,
    write_onetrainer_lora,
    write_peft_lora,
    write_sd15_lora,
    write_xlabs_lora,
    xlabs_layers,
)
from safetensors.torch import save_file

from comfy_xdit.loading.flux import bfl_to_diffusers_rules, load_flux_transformer, read_flux_config
from comfy_xdit.lora import LoraError, LoraState, apply_loras, check_loras, lora_fingerprint, lora_set_key, read_lora

COMFYUI = Path(__file__).resolve().parents[1] / ".comfyui" / "ComfyUI"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def tiny_flux(dtype=torch.bfloat16, **kw):
    kw.setdefault("num_layers", 2)
    kw.setdefault("num_single_layers", 2)
    # .to() on a model prints a diffusers notice about fp32 modules; cast the parameters instead.
    model = make_flux_diffusers_model(**kw)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    assert sd.keys() == expected.keys()
    bad = [k for k in sd if sd[k].dtype != expected[k].dtype or not torch.equal(sd[k], expected[k])]
    worst = {k: (sd[k].float() - expected[k].float()).abs().max().item() for k in bad[:5]}
    assert not bad, f"{len(bad)} weights differ (max |diff| of the first: {worst})"


def applied_once(base, loras) -> dict[str, torch.Tensor]:
    """A fresh copy of ``base`` with ``loras`` applied once."""
    fresh = copy.deepcopy(base)
    apply_loras(fresh, loras, LoraState())
    return fresh.state_dict()


# Every layout, written from one random LoRA (the same numbers, only the keys differ).
LAYOUTS = {
    "kohya": lambda lora, p: write_kohya_lora(lora, p),
    "bfl_comfy_prefix_A_B": lambda lora, p: write_bfl_lora(lora, p),
    "bfl_comfy_saved_up_down": lambda lora, p: write_bfl_lora(lora, p, up=".lora_up.weight", down=".lora_down.weight"),
    "bfl_no_prefix": lambda lora, p: write_bfl_lora(lora, p, prefix=""),
    "bfl_linear1_qkv": lambda lora, p: write_bfl_lora(lora, p),  # ComfyUI's name for linear1's q, k, v rows
    "peft_no_prefix": lambda lora, p: write_peft_lora(lora, p, prefix=""),
    "peft_base_model_prefix": lambda lora, p: write_peft_lora(lora, p, prefix="base_model.model."),
    "peft_default_adapter": lambda lora, p: write_peft_lora(lora, p, up=".lora_B.default.weight", down=".lora_A.default.weight"),
    "diffusers_lora_dot_up": lambda lora, p: write_peft_lora(lora, p, up=".lora.up.weight", down=".lora.down.weight"),
    "diffusers_lora_linear_layer": lambda lora, p: write_peft_lora(
        lora, p, up=".lora_linear_layer.up.weight", down=".lora_linear_layer.down.weight"),
    "lora_A_B_without_weight_suffix": lambda lora, p: write_peft_lora(lora, p, up=".lora_B", down=".lora_A"),
    "onetrainer": lambda lora, p: write_onetrainer_lora(lora, p),
}


@pytest.fixture(scope="module", params=list(DTYPES))
def base(request):
    return tiny_flux(DTYPES[request.param])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_patches_like_the_peft_layout(base, layout, tmp_path):
    exclude = (".linear1",) if layout == "bfl_linear1_qkv" else (".linear1_qkv",)
    lora = random_flux_lora(base, rank=4, seed=1, alpha=8.0, exclude=exclude)
    path = LAYOUTS[layout](lora, tmp_path / "lora.safetensors")
    reference = applied_once(base, [(write_peft_lora(lora, tmp_path / "peft.safetensors"), 0.8)])
    model = copy.deepcopy(base)
    patch_set = read_lora(path, model)
    assert patch_set.unused_keys == []
    assert apply_loras(model, [(path, 0.8)], LoraState())
    assert_same_weights(model, reference)
    plain = base.state_dict()
    touched = {n for n in plain if not torch.equal(plain[n], reference[n])}
    assert touched == {f"{m}.weight" for name in lora.weights for m in lora.layers[name].members}


def test_xlabs_layout(base, tmp_path):
    lora = random_flux_lora(base, rank=4, seed=2, alpha=None, only=xlabs_layers())
    path = write_xlabs_lora(lora, tmp_path / "xlabs.safetensors")
    reference = applied_once(base, [(write_peft_lora(lora, tmp_path / "peft.safetensors"), 1.0)])
    model = copy.deepcopy(base)
    apply_loras(model, [(path, 1.0)], LoraState())
    assert_same_weights(model, reference)


def test_peft_without_alpha_has_scale_one(base, tmp_path):
    lora = random_flux_lora(base, rank=4, seed=3, alpha=None)
    model = copy.deepcopy(base)
    patch_set = read_lora(write_peft_lora(lora, tmp_path / "a.safetensors"), model)
    assert {p.scale for p in patch_set.patches} == {1.0}
    with_alpha = read_lora(write_kohya_lora(random_flux_lora(base, rank=4, alpha=2.0), tmp_path / "b.safetensors"), model)
    assert {p.scale for p in with_alpha.patches} == {0.5}
    assert len(with_alpha.ignored_keys) == 6  # the text-encoder part of a Kohya file


def test_strength_changes_and_removal_restore_exactly(base, tmp_path):
    first = write_kohya_lora(random_flux_lora(base, rank=4, seed=4), tmp_path / "kohya.safetensors")
    second = write_peft_lora(random_flux_lora(base, rank=2, seed=5, alpha=None), tmp_path / "peft.safetensors")
    plain = base.state_dict()
    model = copy.deepcopy(base)
    state = LoraState()
    steps = [
        [(first, 1.0)],
        [(first, 0.5)],
        [(first, 0.5)],  # unchanged: nothing rewritten
        [],
        [(first, 1.0), (second, -0.7)],  # chained LoRAs add up
        [(second, -0.7), (first, 1.0)],  # order is part of the chain
        [(second, 0.3)],
        [(first, 0.0), (second, 0.3)],  # strength 0 is the same as leaving it out
        [(first, 1.0)],
        [],
    ]
    for i, loras in enumerate(steps):
        changed = apply_loras(model, loras, state)
        assert changed == (i == 0 or lora_set_key(loras) != lora_set_key(steps[i - 1])), i
        expected = applied_once(base, loras) if loras else plain
        assert_same_weights(model, expected)
    assert state.originals == {}, "nothing patched, nothing kept"
    assert state.apply_count == 8


def test_backup_on_the_weights_device(base, tmp_path):
    path = write_bfl_lora(random_flux_lora(base, seed=6), tmp_path / "l.safetensors")
    model, state = copy.deepcopy(base), LoraState(backup_device=None)
    apply_loras(model, [(path, 1.0)], state)
    apply_loras(model, [], state)
    assert_same_weights(model, base.state_dict())


def test_fingerprint_follows_the_file(base, tmp_path):
    path = write_peft_lora(random_flux_lora(base, seed=7), tmp_path / "l.safetensors")
    assert lora_fingerprint(path) == lora_fingerprint(str(path))
    model, state = copy.deepcopy(base), LoraState()
    assert apply_loras(model, [(path, 1.0)], state)
    assert not apply_loras(model, [(path, 1.0)], state)
    # The same name with new contents (a retrained LoRA saved over the old one) is a change.
    other = random_flux_lora(base, seed=8)
    write_peft_lora(other, path)
    os.utime(path, ns=(1, 1))
    assert apply_loras(model, [(path, 1.0)], state)
    assert_same_weights(model, applied_once(base, [(write_peft_lora(other, tmp_path / "o.safetensors"), 1.0)]))


# ------------------------------------------------------------------------------------------
# Refusals: clear messages, and the model is left as it was.


def test_another_architecture_is_refused(base, tmp_path):
    with pytest.raises(LoraError, match="matches none of this Flux model's layers; is it a LoRA for another model"):
        read_lora(write_sd15_lora(tmp_path / "sd15.safetensors"), base)


def test_wider_model_lora_is_refused(base, tmp_path):
    wide = tiny_flux(heads=4)
    path = write_kohya_lora(random_flux_lora(wide, seed=9), tmp_path / "wide.safetensors")
    with pytest.raises(LoraError, match=r"was made for a model of another size: layer \S+ expects \[\d+, \d+\] got \[\d+, \d+\]"):
        read_lora(path, base)


def test_bad_files_are_refused(base, tmp_path):
    with pytest.raises(LoraError, match="not found"):
        read_lora(tmp_path / "missing.safetensors", base)
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(LoraError, match="pickle"):
        read_lora(pickle, base)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(LoraError, match="truncated or not a safetensors file"):
        read_lora(garbage, base)
    good = write_peft_lora(random_flux_lora(base, seed=10), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraError, match="truncated"):
        read_lora(truncated, base)


def test_text_encoder_only_and_unsupported_formats_are_refused(base, tmp_path):
    te = tmp_path / "te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, str(te))
    with pytest.raises(LoraError, match="only text-encoder weights"):
        read_lora(te, base)
    lokr = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.zeros(4, 4),
               "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": torch.zeros(8, 8)}, str(lokr))
    with pytest.raises(LoraError, match="LoKr"):
        read_lora(lokr, base)


def test_a_refused_lora_leaves_the_model_as_it_was(base, tmp_path):
    good = write_kohya_lora(random_flux_lora(base, seed=11), tmp_path / "good.safetensors")
    bad = write_kohya_lora(random_flux_lora(tiny_flux(heads=4), seed=12), tmp_path / "wide.safetensors")
    model, state = copy.deepcopy(base), LoraState()
    apply_loras(model, [(good, 1.0)], state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match="another size"):
        apply_loras(model, [(good, 0.5), (bad, 1.0)], state)
    assert_same_weights(model, before)
    apply_loras(model, [], state)
    assert_same_weights(model, base.state_dict())


def test_check_before_loading_from_the_checkpoint_headers(tmp_path):
    # What the host can do before any worker reads a weight: config from the checkpoint's
    # headers, a meta-device model, the LoRA files' headers.
    source = tiny_flux(torch.float32)
    checkpoint = write_bfl_file(source, tmp_path / "flux.safetensors")
    config = read_flux_config(checkpoint)
    good = write_kohya_lora(random_flux_lora(source, seed=14), tmp_path / "good.safetensors")
    (checked,) = check_loras([(good, 0.8)], config)
    assert len(checked.patches) == len(read_lora(good, source).patches)
    wide = write_peft_lora(random_flux_lora(tiny_flux(heads=4), seed=15), tmp_path / "wide.safetensors")
    with pytest.raises(LoraError, match="another size"):
        check_loras([(good, 1.0), (wide, 1.0)], config)
    with pytest.raises(LoraError, match="not a finite number"):
        check_loras([(good, float("nan"))], config)
    with pytest.raises(LoraError, match="not found"):
        check_loras([(tmp_path / "nope.safetensors", 1.0)], config)


def test_lora_for_a_deeper_flux_applies_the_blocks_it_shares(base, tmp_path):
    # ComfyUI's behaviour: keys for blocks this model lacks are reported and skipped.
    deep = tiny_flux(num_layers=3, num_single_layers=3)
    path = write_bfl_lora(random_flux_lora(deep, seed=13), tmp_path / "deep.safetensors")
    patch_set = read_lora(path, base)
    assert patch_set.unused_keys and all(".double_blocks.2." in k or ".single_blocks.2." in k for k in patch_set.unused_keys)


# ------------------------------------------------------------------------------------------
# Against ComfyUI's own patching.


@pytest.fixture(scope="module")
def comfy():
    if not (COMFYUI / "comfy" / "lora.py").exists():
        pytest.skip(f"pristine ComfyUI not found at {COMFYUI} (tools/setup.sh puts it there)")
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))  # appended, so it never shadows this repo's modules
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    return comfy


def comfy_patched(comfy, base_file: Path, head_dim: int, axes, dtype, chain) -> dict[str, torch.Tensor]:
    """What UNETLoader + LoraLoaderModelOnly (chained) + ModelPatcher give, in BFL names."""
    detect = comfy.model_detection.detect_unet_config

    def tiny_detect(state_dict, key_prefix, metadata=None):
        # Stock ComfyUI pins Flux's 128-wide heads and rotary axes (16, 56, 56); the tiny test
        # model has other head widths. Nothing else of the detected config is touched.
        config = detect(state_dict, key_prefix, metadata=metadata)
        if config and config.get("image_model") == "flux":
            config["num_heads"] = config["hidden_size"] // head_dim
            config["axes_dim"] = list(axes)
        return config

    comfy.model_detection.detect_unet_config = tiny_detect
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(
            comfy.utils.load_torch_file(str(base_file), safe_load=True), model_options={"dtype": dtype})
    finally:
        comfy.model_detection.detect_unet_config = detect
    for path, strength in chain:
        if strength == 0:  # LoraLoader returns the model unchanged
            continue
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def bfl_to_diffusers(config, bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for rule in bfl_to_diffusers_rules(config):
        out.update(rule.apply(bfl[rule.source]))
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matches_comfyui_patching_bit_for_bit(comfy, dtype, tmp_path):
    dtype = DTYPES[dtype]
    source = make_flux_diffusers_model(num_layers=2, num_single_layers=2, seed=3)
    base_file = write_bfl_file(source, tmp_path / "flux.safetensors", prefix="model.diffusion_model.", dtype=dtype)
    ours = load_flux_transformer(base_file, dtype=dtype)
    config = dict(ours.config)

    kohya = write_kohya_lora(random_flux_lora(ours, rank=4, seed=20, alpha=16.0), tmp_path / "kohya.safetensors")
    peft = write_peft_lora(random_flux_lora(ours, rank=3, seed=21, alpha=None), tmp_path / "peft.safetensors")
    # ComfyUI-saved layout, with linear1_qkv, full-weight and bias diffs on fused and swapped layers.
    comfy_lora = random_flux_lora(ours, rank=8, seed=22, alpha=3.0, dtype=torch.float16, exclude=(".linear1", "final_layer.linear", "img_in"))
    g = torch.Generator().manual_seed(23)
    w = ours.config.num_attention_heads * ours.config.attention_head_dim
    extra = {
        "diffusion_model.img_in.diff": 0.01 * torch.randn(ours.x_embedder.weight.shape, generator=g),
        "diffusion_model.double_blocks.1.img_attn.qkv.diff_b": 0.01 * torch.randn(3 * w, generator=g),
        "diffusion_model.final_layer.adaLN_modulation.1.diff_b": 0.01 * torch.randn(2 * w, generator=g),
    }
    saved = write_bfl_lora(comfy_lora, tmp_path / "comfy.safetensors", up=".lora_up.weight", down=".lora_down.weight", extra=extra)
    # (XLabs files are left out: ComfyUI 0.3.75 converts them only when they have Flux-dev's 19 + 38 blocks.)

    chains = [
        [(kohya, 1.0)],
        [(kohya, 0.5)],
        [(peft, 0.8)],
        [(kohya, 0.75), (peft, -1.3), (saved, 0.6)],
    ]
    state = LoraState()
    for chain in chains:
        apply_loras(ours, chain, state)
        reference = bfl_to_diffusers(config, comfy_patched(
            comfy, base_file, config["attention_head_dim"], config["axes_dims_rope"], dtype, chain))
        assert_same_weights(ours, reference)
