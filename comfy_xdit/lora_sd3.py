"""Where SD3 / SD3.5 LoRA keys land in a diffusers ``SD3Transformer2DModel``.

The names follow ComfyUI 0.3.75's LoRA key table for MMDiT models (``comfy.lora.model_lora_keys_unet``
with ``comfy.utils.mmdit_to_diffusers``):

- Stability AI's layer names as ComfyUI's model holds them: ``diffusion_model.joint_blocks.0.x_block.attn.qkv``
  (ComfyUI's own saved LoRAs), Kohya / sd-scripts ``lora_unet_joint_blocks_0_x_block_attn_qkv``; also
  without prefix or with ``model.diffusion_model.``;
- diffusers names: ``transformer.transformer_blocks.0.attn.to_q`` (diffusers / PEFT / SimpleTuner),
  ``base_model.model.<name>``, OneTrainer ``lora_transformer_<name with underscores>``, SimpleTuner
  ``lycoris_<...>``; also without prefix.

SAI fuses q, k, v into one ``qkv`` layer (``x_block.attn``, ``context_block.attn`` and SD3.5's
image-only ``x_block.attn2``); diffusers keeps them apart, so a LoRA on a fused layer becomes row
ranges of the three diffusers weights. SAI's final adaLN and the last block's context adaLN (a
pre-only block: shift and scale only) emit (shift, scale) where diffusers stores (scale, shift):
their rows are swapped, as ComfyUI's ``swap_scale_shift`` does.
"""

from __future__ import annotations

import torch

from .lora import LayerTarget, Segment, _KeyEntry, _diffusers_spellings, _named_params


def _sai_layers(num_layers: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(SAI layer, diffusers layers it fuses in row order, swapped halves) for every block and the rest."""
    layers = [
        ("context_embedder", ("context_embedder",), False),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), False),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), False),
        ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), False),
        ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), False),
        ("x_embedder.proj", ("pos_embed.proj",), False),
        ("final_layer.linear", ("proj_out",), False),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
    ]
    for i in range(num_layers):
        b, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == num_layers - 1  # the pre-only context block: AdaLayerNormContinuous in diffusers
        layers += [
            (f"{b}.x_block.attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), False),
            (f"{b}.context_block.attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), False),
            (f"{b}.x_block.attn2.qkv", (f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"), False),
            (f"{b}.x_block.attn.proj", (f"{d}.attn.to_out.0",), False),
            (f"{b}.context_block.attn.proj", (f"{d}.attn.to_add_out",), False),
            (f"{b}.x_block.attn2.proj", (f"{d}.attn2.to_out.0",), False),
            (f"{b}.x_block.mlp.fc1", (f"{d}.ff.net.0.proj",), False),
            (f"{b}.x_block.mlp.fc2", (f"{d}.ff.net.2",), False),
            (f"{b}.context_block.mlp.fc1", (f"{d}.ff_context.net.0.proj",), False),
            (f"{b}.context_block.mlp.fc2", (f"{d}.ff_context.net.2",), False),
            (f"{b}.x_block.adaLN_modulation.1", (f"{d}.norm1.linear",), False),
            (f"{b}.context_block.adaLN_modulation.1", (f"{d}.norm1_context.linear",), last),
        ]
        # qk RMSNorm scales (SD3.5): ComfyUI addresses them like any other weight (diff patches only).
        for attn, sai in (("attn", "x_block.attn"), ("attn2", "x_block.attn2")):
            layers += [(f"{b}.{sai}.ln_q", (f"{d}.{attn}.norm_q",), False), (f"{b}.{sai}.ln_k", (f"{d}.{attn}.norm_k",), False)]
        layers += [(f"{b}.context_block.attn.ln_q", (f"{d}.attn.norm_added_q",), False),
                   (f"{b}.context_block.attn.ln_k", (f"{d}.attn.norm_added_k",), False)]
    return layers


def _target(name: str, params: tuple[str, ...], swap: bool, shapes: dict) -> LayerTarget | None:
    if not all(p in shapes for p in params):
        return None  # a layer this model (or this rank's stage) does not have
    rest = shapes[params[0]][1:]
    rows = sum(shapes[p][0] for p in params)
    if swap:
        (param,) = params
        half = rows // 2
        # SAI row r (shift first) is diffusers row (r + half) % rows (scale first).
        return LayerTarget(name, (rows, *rest), (Segment(param, 0, half, half), Segment(param, half, 0, half)))
    segments, start = [], 0
    for param in params:
        segments.append(Segment(param, 0, start, shapes[param][0]))
        start += shapes[param][0]
    return LayerTarget(name, (rows, *rest), tuple(segments))


def _sai_spellings(b: str) -> tuple[str, ...]:
    return (f"diffusion_model.{b}", f"lora_unet_{b.replace('.', '_')}", b, f"model.diffusion_model.{b}")


def sd3_lora_key_map(model: torch.nn.Module) -> dict[str, _KeyEntry]:
    """LoRA base name (the key without ``.lora_up.weight`` etc.) -> layer target in this SD3 model."""
    shapes = {n: tuple(p.shape) for n, p in _named_params(model).items()}
    key_map: dict[str, _KeyEntry] = {}

    def add(names, entry: _KeyEntry) -> None:
        for name in names:
            old = key_map.get(name)
            assert old is None or old == entry, f"internal: LoRA key {name} maps to two layers"
            key_map[name] = entry

    for sai, members, swap in _sai_layers(model.config.num_layers):
        weight = _target(sai, tuple(f"{m}.weight" for m in members), swap, shapes)
        if weight is None:
            continue
        bias = _target(sai + ".bias", tuple(f"{m}.bias" for m in members), swap, shapes)
        add(_sai_spellings(sai), _KeyEntry(weight, bias))

    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        base = name[: -len(".weight")]
        weight = LayerTarget(base, shape, (Segment(name, 0, 0, shape[0]),))
        bias_name = base + ".bias"
        bias = LayerTarget(bias_name, shapes[bias_name], (Segment(bias_name, 0, 0, shapes[bias_name][0]),)) if bias_name in shapes else None
        add(_diffusers_spellings(base), _KeyEntry(weight, bias))
    return key_map
