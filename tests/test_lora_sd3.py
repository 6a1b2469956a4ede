"""LoRAs on a loaded SD3 / SD3.5: every common file layout, exact restore, ComfyUI's arithmetic.

Tiny random SD3 transformers and random LoRA files written at test time (tests/lora_files.py,
which reads the SAI <-> diffusers layer table off the test's own SAI writer). The comparison with
ComfyUI runs its own loader and patcher (comfy.sd.load_diffusion_model_state_dict,
comfy.sd.load_lora_for_models as LoraLoaderModelOnly calls it, ModelPatcher.patch_model) on the
same files; ComfyUI's MMDiT pins 64-wide heads, as many as blocks, so that model is 2 x 64 wide.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from checkpoints import make_flux_diffusers_model, make_sd3_diffusers_model, write_sd3_file
from distributed import cpu_engine, relative_error, run_on_ranks
from lora_files import (
    random_flux_lora,
    random_sd3_lora,
    write_bfl_lora,
    write_kohya_lora,
    write_onetrainer_lora,
    write_peft_lora,
    write_xlabs_lora,
    xlabs_layers,
)
from test_lora import assert_same_weights, comfy  # noqa: F401 - comfy is a fixture

from comfy_xdit.loading.sd3 import _convert, load_sd3_transformer, read_sd3_config
from comfy_xdit.lora import LoraError, LoraState, apply_loras, check_loras, read_lora

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ARCHITECTURES = {
    "sd3": dict(num_layers=2, heads=2, head_dim=8),
    "sd3.5-dual": dict(num_layers=2, heads=2, head_dim=8, dual_attention_layers=(0,), qk_norm="rms_norm"),
}


def tiny_sd3(arch: str = "sd3.5-dual", dtype=torch.bfloat16, seed: int = 0, **kw):
    model = make_sd3_diffusers_model(**{**ARCHITECTURES[arch], **kw}, seed=seed)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def applied_once(base, loras) -> dict[str, torch.Tensor]:
    fresh = copy.deepcopy(base)
    apply_loras(fresh, loras, LoraState())
    return fresh.state_dict()


LAYOUTS = {
    "kohya": lambda lora, p: write_kohya_lora(lora, p),
    "sai_comfy_saved": lambda lora, p: write_bfl_lora(lora, p, up=".lora_up.weight", down=".lora_down.weight"),
    "sai_model_diffusion_model_prefix": lambda lora, p: write_bfl_lora(lora, p, prefix="model.diffusion_model."),
    "sai_no_prefix": lambda lora, p: write_bfl_lora(lora, p, prefix=""),
    "peft_no_prefix": lambda lora, p: write_peft_lora(lora, p, prefix=""),
    "peft_base_model_prefix": lambda lora, p: write_peft_lora(lora, p, prefix="base_model.model."),
    "diffusers_lora_dot_up": lambda lora, p: write_peft_lora(lora, p, up=".lora.up.weight", down=".lora.down.weight"),
    "onetrainer": lambda lora, p: write_onetrainer_lora(lora, p),
}


@pytest.fixture(scope="module", params=[(a, d) for a in ARCHITECTURES for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def base(request):
    arch, dtype = request.param
    return tiny_sd3(arch, DTYPES[dtype])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_patches_like_the_peft_layout(base, layout, tmp_path):
    lora = random_sd3_lora(base, rank=4, seed=1, alpha=8.0)
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
    # q, k, v of SD3.5's attn2 and the swapped adaLN halves are among them
    assert any(".attn2.to_k." in n for n in touched) == ("attn2" in str(list(lora.weights)))
    assert "norm_out.linear.weight" in touched


def test_strength_changes_and_removal_restore_exactly(base, tmp_path):
    first = write_kohya_lora(random_sd3_lora(base, rank=4, seed=4), tmp_path / "kohya.safetensors")
    second = write_peft_lora(random_sd3_lora(base, rank=2, seed=5, alpha=None), tmp_path / "peft.safetensors")
    plain = base.state_dict()
    model, state = copy.deepcopy(base), LoraState()
    for loras in ([(first, 1.0)], [(first, 0.5)], [], [(first, 1.0), (second, -0.7)], [(second, 0.3)], []):
        apply_loras(model, loras, state)
        assert_same_weights(model, applied_once(base, loras) if loras else plain)
    assert state.originals == {}


# ------------------------------------------------------------------------------------------
# Refusals by name: a Flux LoRA on SD3 and an SD3 LoRA on Flux.


def test_a_flux_lora_on_sd3_is_refused_by_name(base, tmp_path):
    flux = make_flux_diffusers_model(num_layers=1, num_single_layers=1)
    for writer in (write_kohya_lora, write_bfl_lora, write_peft_lora):
        path = writer(random_flux_lora(flux, seed=2), tmp_path / f"flux_{writer.__name__}.safetensors")
        with pytest.raises(LoraError, match=r"is a Flux LoRA \(it has keys such as .*\), but the model is Stable Diffusion 3 / 3.5; "
                                            "pick a LoRA made for Stable Diffusion 3 / 3.5"):
            read_lora(path, base)
    xlabs = write_xlabs_lora(random_flux_lora(flux, seed=3, alpha=None, only=xlabs_layers()), tmp_path / "xlabs.safetensors")
    with pytest.raises(LoraError, match="is a Flux LoRA"):
        read_lora(xlabs, base)


def test_an_sd3_lora_on_flux_is_refused_by_name(base, tmp_path):
    flux = make_flux_diffusers_model(num_layers=1, num_single_layers=1)
    path = write_kohya_lora(random_sd3_lora(base, seed=6), tmp_path / "sd3.safetensors")
    with pytest.raises(LoraError, match=r"is a Stable Diffusion 3 / 3.5 LoRA \(it has keys such as lora_unet_joint_blocks_.*\), "
                                        "but the model is Flux"):
        read_lora(path, flux)


def test_a_wider_sd3_lora_is_refused_and_check_reads_headers_only(tmp_path):
    source = tiny_sd3("sd3.5-dual", torch.float32)  # qk norms state the head width (a file without them has 64)
    checkpoint = write_sd3_file(source, tmp_path / "sd3.safetensors")
    config = read_sd3_config(checkpoint)
    good = write_peft_lora(random_sd3_lora(source, seed=7), tmp_path / "good.safetensors")
    (checked,) = check_loras([(good, 0.8)], config)
    assert len(checked.patches) == len(read_lora(good, source).patches)
    wide = write_kohya_lora(random_sd3_lora(tiny_sd3("sd3.5-dual", heads=4), seed=8), tmp_path / "wide.safetensors")
    with pytest.raises(LoraError, match=r"made for a model of another size: layer \S+ expects .* another Stable Diffusion 3 / 3.5 variant"):
        check_loras([(good, 1.0), (wide, 1.0)], config)


# ------------------------------------------------------------------------------------------
# Against ComfyUI's own patching.


def comfy_patched_sd3(comfy, base_file, dtype, chain) -> dict[str, torch.Tensor]:  # noqa: F811
    """What UNETLoader + LoraLoaderModelOnly (chained) + ModelPatcher give, in SAI names."""
    patcher = comfy.sd.load_diffusion_model_state_dict(
        comfy.utils.load_torch_file(str(base_file), safe_load=True), model_options={"dtype": dtype})
    assert type(patcher.model).__name__ == "SD3"
    for path, strength in chain:
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matches_comfyui_patching_bit_for_bit(comfy, arch, dtype, tmp_path):  # noqa: F811
    dtype = DTYPES[dtype]
    # ComfyUI's MMDiT: 64-wide heads, as many heads as blocks.
    source = make_sd3_diffusers_model(**{**ARCHITECTURES[arch], "head_dim": 64}, seed=3)
    base_file = write_sd3_file(source, tmp_path / "sd3.safetensors", dtype=dtype)
    ours = load_sd3_transformer(base_file, dtype=dtype)

    kohya = write_kohya_lora(random_sd3_lora(ours, rank=4, seed=20, alpha=16.0), tmp_path / "kohya.safetensors")
    peft = write_peft_lora(random_sd3_lora(ours, rank=3, seed=21, alpha=None), tmp_path / "peft.safetensors")
    onetrainer = write_onetrainer_lora(random_sd3_lora(ours, rank=2, seed=24, alpha=1.0), tmp_path / "onetrainer.safetensors")
    # ComfyUI-saved layout, with full-weight and bias diffs on fused and swapped layers.
    g = torch.Generator().manual_seed(23)
    w = ours.config.num_attention_heads * ours.config.attention_head_dim
    extra = {
        "diffusion_model.context_embedder.diff": 0.01 * torch.randn(ours.context_embedder.weight.shape, generator=g),
        "diffusion_model.joint_blocks.0.x_block.attn.qkv.diff_b": 0.01 * torch.randn(3 * w, generator=g),
        "diffusion_model.final_layer.adaLN_modulation.1.diff_b": 0.01 * torch.randn(2 * w, generator=g),
        "diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.diff_b": 0.01 * torch.randn(2 * w, generator=g),
    }
    saved = write_bfl_lora(random_sd3_lora(ours, rank=8, seed=22, alpha=3.0, dtype=torch.float16), tmp_path / "comfy.safetensors",
                           up=".lora_up.weight", down=".lora_down.weight", extra=extra)
    chains = [
        [(kohya, 1.0)],
        [(peft, 0.8)],
        [(onetrainer, 1.5)],
        [(kohya, 0.75), (peft, -1.3), (saved, 0.6)],
    ]
    plain = {k: v.clone() for k, v in ours.state_dict().items()}
    every_linear = {f"{m}.weight" for layer in random_sd3_lora(ours).layers.values() for m in layer.members}
    state = LoraState()
    for chain in chains:
        apply_loras(ours, chain, state)
        reference, unused = _convert(comfy_patched_sd3(comfy, base_file, dtype, chain))
        assert unused == []
        assert_same_weights(ours, reference)
        # Both sides patched every linear layer (equal because neither applied anything would prove nothing).
        assert every_linear <= {k for k, v in reference.items() if not torch.equal(v, plain[k])}
    apply_loras(ours, [], state)
    assert_same_weights(ours, load_sd3_transformer(base_file, dtype=dtype).state_dict())


# ------------------------------------------------------------------------------------------
# Parallel: the same LoRA on N workers equals one worker.

PARALLEL_TOLERANCE = 1e-4
PARALLEL = {"ulysses=2": dict(ulysses_degree=2), "cfg parallel": dict(use_cfg_parallel=True), "tensor=2": dict(tensor_parallel_degree=2)}


def _request():
    from comfy_xdit.requests import SampleRequest, SD3Conditioning

    g = torch.Generator().manual_seed(1)
    positive = SD3Conditioning(torch.randn(1, 9, 32, generator=g), torch.randn(1, 24, generator=g))
    negative = SD3Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g))
    return SampleRequest(torch.zeros(1, 16, 10, 14), positive, negative, seed=42, steps=3, cfg=4.0)


def _with_lora_then_without(config_kwargs: dict, lora: str) -> list[torch.Tensor]:
    from comfy_xdit.requests import ModelSpec

    engine = cpu_engine(config_kwargs)
    engine.set_model(tiny_sd3("sd3.5-dual", torch.float32, heads=4), ModelSpec("tiny", family="sd3", dtype="float32"))
    request = _request()
    return [engine.sample(dataclasses.replace(request, loras=((lora, 0.8),))), engine.sample(request)]


def _all_parallel_cases(lora: str) -> dict:
    return {name: _with_lora_then_without(kwargs, lora) for name, kwargs in PARALLEL.items()}


def test_a_lora_on_two_workers_equals_one_worker_and_is_removed_again(tmp_path):
    lora = str(write_kohya_lora(random_sd3_lora(tiny_sd3("sd3.5-dual", torch.float32, heads=4), seed=9, scale=0.2),
                                tmp_path / "lora.safetensors"))
    with_lora, without = _with_lora_then_without({}, lora)
    assert relative_error(with_lora, without) > 1e-2, "the LoRA must change the result, or this test proves nothing"
    results = run_on_ranks(2, _all_parallel_cases, lora)
    for rank_results in results:
        for name, (ours_with, ours_without) in rank_results.items():
            assert relative_error(ours_with, with_lora) < PARALLEL_TOLERANCE, name
            assert relative_error(ours_without, without) < PARALLEL_TOLERANCE, name


# ------------------------------------------------------------------------------------------
# The bridge (what the Parallel LoRA Loader node calls): checks from the headers, by family.


def test_the_lora_node_check_takes_sd3_loras_and_refuses_flux_ones(tmp_path):
    from comfy_xdit import bridge
    from comfy_xdit.config import ParallelConfig
    from comfy_xdit.requests import ModelSpec

    source = tiny_sd3("sd3.5-dual", torch.float32)
    model = bridge.XditModel(ModelSpec(str(write_sd3_file(source, tmp_path / "sd35.safetensors")), family="sd3"),
                             ParallelConfig(devices=("cpu",)))
    bridge.check_lora(model, str(write_kohya_lora(random_sd3_lora(source, seed=10), tmp_path / "sd3.safetensors")), 1.0)
    flux = write_peft_lora(random_flux_lora(make_flux_diffusers_model(num_layers=1, num_single_layers=1), seed=11),
                           tmp_path / "flux.safetensors")
    with pytest.raises(LoraError, match="is a Flux LoRA .* but the model is Stable Diffusion 3 / 3.5"):
        bridge.check_lora(model, str(flux), 1.0)


def test_a_lora_on_the_patch_embedding_convolution_is_refused_naming_the_layer(base, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "conv.safetensors"
    width = base.pos_embed.proj.weight.shape[0]
    save_file({"lora_unet_x_embedder_proj.lora_down.weight": torch.zeros(4, 16, 2, 2),
               "lora_unet_x_embedder_proj.lora_up.weight": torch.zeros(width, 4, 1, 1)}, str(path))
    with pytest.raises(LoraError, match=r"layer lora_unet_x_embedder_proj has 4-D LoRA weights; only LoRAs on linear \(2-D\) layers"):
        read_lora(path, base)
