"""Random Flux LoRA files in the layouts users have, written at test time.

A test LoRA is described once in Black Forest Labs' layer names (``FluxLora``: per BFL layer an
``up`` for the whole, possibly fused, layer, one ``down`` and an optional ``alpha``) and written in
each layout. The BFL -> diffusers table here is written by hand, independently of the loader's
and of comfy_xdit.lora's, so the tests check the code rather than itself. Splitting a fused
layer's ``up`` by rows (and copying its ``down``) gives the equivalent per-projection LoRA, since
``up[rows] @ down == (up @ down)[rows]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class BflLayer:
    """A BFL linear layer and the diffusers weights it fuses (rows in order)."""

    name: str
    members: tuple[str, ...]  # diffusers module names (no ".weight")
    rows: tuple[int, ...]
    in_features: int
    swap_halves: bool = False  # BFL final adaLN (shift, scale) vs diffusers norm_out (scale, shift)

    @property
    def out_features(self) -> int:
        return sum(self.rows)


def bfl_layers(model) -> dict[str, BflLayer]:
    """Every linear layer of this diffusers Flux in BFL names, plus ComfyUI's ``linear1_qkv``."""
    shapes = {n[: -len(".weight")]: tuple(p.shape) for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 2}
    layers: dict[str, BflLayer] = {}

    def add(name: str, members: list[str], swap: bool = False) -> None:
        ins = {shapes[m][1] for m in members}
        assert len(ins) == 1, (name, members)
        layers[name] = BflLayer(name, tuple(members), tuple(shapes[m][0] for m in members), ins.pop(), swap)

    for bfl, diff in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{diff}.linear_1" in shapes:
            add(f"{bfl}.in_layer", [f"time_text_embed.{diff}.linear_1"])
            add(f"{bfl}.out_layer", [f"time_text_embed.{diff}.linear_2"])
    add("img_in", ["x_embedder"])
    add("txt_in", ["context_embedder"])
    for i in range(model.config.num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        add(f"{b}.img_mod.lin", [f"{d}.norm1.linear"])
        add(f"{b}.txt_mod.lin", [f"{d}.norm1_context.linear"])
        add(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        add(f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        add(f"{b}.img_attn.proj", [f"{d}.attn.to_out.0"])
        add(f"{b}.txt_attn.proj", [f"{d}.attn.to_add_out"])
        add(f"{b}.img_mlp.0", [f"{d}.ff.net.0.proj"])
        add(f"{b}.img_mlp.2", [f"{d}.ff.net.2"])
        add(f"{b}.txt_mlp.0", [f"{d}.ff_context.net.0.proj"])
        add(f"{b}.txt_mlp.2", [f"{d}.ff_context.net.2"])
    for i in range(model.config.num_single_layers):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        add(f"{b}.modulation.lin", [f"{d}.norm.linear"])
        add(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        add(f"{b}.linear1_qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        add(f"{b}.linear2", [f"{d}.proj_out"])
    add("final_layer.linear", ["proj_out"])
    add("final_layer.adaLN_modulation.1", ["norm_out.linear"], swap=True)
    return layers


@dataclass
class FluxLora:
    """A LoRA in BFL layer names: name -> (up [out, rank], down [rank, in], alpha or None)."""

    layers: dict[str, BflLayer]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]

    def diffusers_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
        """The same LoRA per diffusers module (fused ``up`` split by rows, ``down`` shared)."""
        out = {}
        for name, (up, down, alpha) in self.weights.items():
            layer = self.layers[name]
            if layer.swap_halves:
                shift, scale = up.chunk(2, dim=0)
                up = torch.cat([scale, shift], dim=0)
            for member, part in zip(layer.members, up.split(list(layer.rows), dim=0)):
                assert member not in out, f"{member} would get two LoRAs"
                out[member] = (part.contiguous(), down, alpha)
        return out


DEFAULT_EXCLUDE = (".linear1_qkv",)  # the full linear1 covers those rows already


def random_flux_lora(
    model,
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = 8.0,
    dtype: torch.dtype = torch.bfloat16,
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    scale: float = 0.05,
) -> FluxLora:
    """A random LoRA on every linear layer of ``model`` but those ending in ``exclude`` (or only on
    the BFL names containing one of ``only``)."""
    layers = bfl_layers(model)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, layer in layers.items():
        if only is not None and not any(o in name for o in only):
            continue
        if only is None and name.endswith(exclude):
            continue
        up = (scale * torch.randn(layer.out_features, rank, generator=g)).to(dtype)
        down = (torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5).to(dtype)
        weights[name] = (up, down, alpha)
    return FluxLora(layers, weights)


def _save(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def _alpha(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype)


def write_bfl_lora(lora: FluxLora, path, prefix: str = "diffusion_model.", up: str = ".lora_B.weight",
                   down: str = ".lora_A.weight", extra: dict | None = None) -> Path:
    """BFL layer names; ComfyUI's own saved LoRAs use prefix ``diffusion_model.`` and lora_up/lora_down."""
    sd = {}
    for name, (u, d, a) in lora.weights.items():
        sd[f"{prefix}{name}{up}"], sd[f"{prefix}{name}{down}"] = u, d
        if a is not None:
            sd[f"{prefix}{name}.alpha"] = _alpha(a, u)
    sd.update(extra or {})
    return _save(sd, path)


def write_kohya_lora(lora: FluxLora, path, text_encoder_keys: bool = True) -> Path:
    """sd-scripts' Flux layout: lora_unet_<BFL name with underscores>.lora_down/lora_up/alpha."""
    sd = {}
    for name, (u, d, a) in lora.weights.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = u, d
        if a is not None:
            sd[f"{key}.alpha"] = _alpha(a, u)
    if text_encoder_keys:  # sd-scripts also trains CLIP-L; a model-only loader ignores these
        g = torch.Generator().manual_seed(99)
        for te in ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"):
            sd[f"{te}.lora_down.weight"] = torch.randn(4, 8, generator=g).to(torch.bfloat16)
            sd[f"{te}.lora_up.weight"] = torch.randn(8, 4, generator=g).to(torch.bfloat16)
            sd[f"{te}.alpha"] = torch.tensor(4.0, dtype=torch.bfloat16)
    return _save(sd, path)


def write_peft_lora(lora: FluxLora, path, prefix: str = "transformer.", alpha: bool = True,
                    up: str = ".lora_B.weight", down: str = ".lora_A.weight") -> Path:
    """diffusers/PEFT (AI-toolkit, SimpleTuner) layout: transformer.<diffusers name>.lora_A/lora_B."""
    sd = {}
    for name, (u, d, a) in lora.diffusers_weights().items():
        sd[f"{prefix}{name}{up}"], sd[f"{prefix}{name}{down}"] = u, d
        if alpha and a is not None:
            sd[f"{prefix}{name}.alpha"] = _alpha(a, u)
    return _save(sd, path)


def write_onetrainer_lora(lora: FluxLora, path) -> Path:
    """OneTrainer: lora_transformer_<diffusers name with underscores>.lora_down/lora_up/alpha."""
    sd = {}
    for name, (u, d, a) in lora.diffusers_weights().items():
        key = "lora_transformer_" + name.replace(".", "_")
        sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = u, d
        if a is not None:
            sd[f"{key}.alpha"] = _alpha(a, u)
    return _save(sd, path)


_XLABS_NAMES = {
    "img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2",
    "img_attn.proj": "proj_lora1", "txt_attn.proj": "proj_lora2",
    "linear1_qkv": "qkv_lora", "linear2": "proj_lora",
}


def xlabs_layers() -> tuple[str, ...]:
    return tuple(_XLABS_NAMES)


def write_xlabs_lora(lora: FluxLora, path) -> Path:
    """XLabs / USO: double_blocks.0.processor.qkv_lora1.down.weight (no alpha). Layers must be
    those XLabs trains (``random_flux_lora(..., only=xlabs_layers(), alpha=None)``)."""
    sd = {}
    for name, (u, d, a) in lora.weights.items():
        block, index, layer = name.split(".", 2)
        assert a is None and layer in _XLABS_NAMES, f"XLabs has no alpha and no {layer}"
        key = f"{block}.{index}.processor.{_XLABS_NAMES[layer]}"
        sd[f"{key}.up.weight"], sd[f"{key}.down.weight"] = u, d
    return _save(sd, path)


def write_sd15_lora(path) -> Path:
    """A LoRA for SD1.5's UNet (Kohya names): another architecture."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for key in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_mid_block_attentions_0_proj_out"):
        sd[f"{key}.lora_down.weight"] = torch.randn(4, 320, generator=g).to(torch.float16)
        sd[f"{key}.lora_up.weight"] = torch.randn(320, 4, generator=g).to(torch.float16)
        sd[f"{key}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    return _save(sd, path)


# ------------------------------------------------------------------------------------------
# SD3 / SD3.5: the same FluxLora container, in Stability AI's layer names (``joint_blocks...``).


def sd3_sai_layers(model) -> dict[str, BflLayer]:
    """Every 2-D linear layer of this diffusers SD3 in SAI names, read off the test's own SAI writer.

    Each diffusers tensor is stood in for by a vector numbering its rows; after
    ``checkpoints.diffusers_to_sai_sd3_state_dict`` (written independently of comfy_xdit's tables)
    each SAI tensor's numbers say which diffusers rows it holds, in which order (fused q/k/v,
    swapped adaLN halves).
    """
    from checkpoints import diffusers_to_sai_sd3_state_dict

    params = dict(model.named_parameters())
    names = list(model.state_dict())
    stride = 2 ** 20
    numbered = {n: i * stride + torch.arange(model.state_dict()[n].shape[0], dtype=torch.float64) for i, n in enumerate(names)}
    layers = {}
    for sai, rows in diffusers_to_sai_sd3_state_dict(numbered).items():
        if not sai.endswith(".weight"):
            continue
        members, sizes = [], []
        for value in rows.tolist():
            member = names[int(value // stride)]
            if not members or members[-1] != member:
                members.append(member)
                sizes.append(0)
            sizes[-1] += 1
        if params[members[0]].ndim != 2:
            continue  # conv patch embedding, qk norm scales
        swap = int(rows[0] % stride) != 0
        layer = sai[: -len(".weight")]
        layers[layer] = BflLayer(layer, tuple(m[: -len(".weight")] for m in members) if not swap else (members[0][: -len(".weight")],),
                                 tuple(sizes) if not swap else (sum(sizes),), params[members[0]].shape[1], swap)
    return layers


def random_sd3_lora(model, rank: int = 4, seed: int = 0, alpha: float | None = 8.0, dtype: torch.dtype = torch.bfloat16,
                    scale: float = 0.05) -> FluxLora:
    """A random LoRA on every linear layer of this SD3 model (SAI names)."""
    layers = sd3_sai_layers(model)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, layer in layers.items():
        up = (scale * torch.randn(layer.out_features, rank, generator=g)).to(dtype)
        down = (torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5).to(dtype)
        weights[name] = (up, down, alpha)
    return FluxLora(layers, weights)
