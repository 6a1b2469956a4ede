"""Flux.1 transformer checkpoints, loaded offline into diffusers' ``FluxTransformer2DModel``.

Accepted: a single .safetensors file in Black Forest Labs' original key layout (what ComfyUI
users keep in models/diffusion_models or models/unet), with or without ComfyUI's
``model.diffusion_model.`` prefix, a single file in diffusers' key layout, and a diffusers
folder (plain, sharded, or a pipeline folder with a ``transformer/`` subfolder).

No code path reaches a model hub: the config is inferred from tensor shapes in the headers, the
model is built from that config on the meta device, and the weights are assigned to it.
diffusers' own single-file converter is not used: it pins the width to 3072 (so tiny test
models and other widths fail) and needs the whole state dict in memory; the table below maps
key by key instead, so a caller can read a subset of blocks.

Rotary axes: ComfyUI pins Flux's axes to (16, 56, 56), which needs a head width of 128. Shapes
cannot tell the split for other head widths, so ``flux_axes_dims_rope`` picks one (see there);
a diffusers folder's config.json, where present, wins.

fp8: float8 weights (``float8_e4m3fn``/``float8_e5m2``) are upcast to the requested dtype; in
ComfyUI's "scaled fp8" files each such weight ``X.weight`` has a ``X.scale_weight`` beside it,
and the weight is multiplied by it (in float32) before the cast. Integer-quantized files
(bitsandbytes NF4, int8) are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint_files import DIFFUSERS_LAYOUT, TransformerCheckpoint, as_load_dtype, refuse_key_mismatch, refuse_quantized
from .safetensors_files import CheckpointError, SafetensorsSource, assign_weights, find_layouts

BFL_LAYOUT = "bfl"

# Keys whose presence (after the prefix) identifies each layout of a Flux.1 transformer. Other
# DiTs share some names (SD3 and QwenImage have transformer_blocks and x_embedder/img_in; Chroma
# and Flux.2 have double_blocks) but none has all of these.
_LAYOUT_SIGNATURES = {
    BFL_LAYOUT: (
        "img_in.weight",
        "txt_in.weight",
        "time_in.in_layer.weight",
        "vector_in.in_layer.weight",
        "final_layer.linear.weight",
    ),
    DIFFUSERS_LAYOUT: (
        "x_embedder.weight",
        "context_embedder.weight",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "time_text_embed.text_embedder.linear_1.weight",
        "proj_out.weight",
    ),
}
_BLOCK_PATTERNS = {
    BFL_LAYOUT: (re.compile(r"double_blocks\.(\d+)\."), re.compile(r"single_blocks\.(\d+)\.")),
    DIFFUSERS_LAYOUT: (
        re.compile(r"transformer_blocks\.(\d+)\."),
        re.compile(r"single_transformer_blocks\.(\d+)\."),
    ),
}


# Flux.1's MLP is 4x the width; diffusers hard-codes it, so a file with another ratio is refused.
_MLP_RATIO = 4


def flux_axes_dims_rope(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims per position axis (index, row, column); they sum to ``head_dim``.

    128 gives Flux's (16, 56, 56). Other widths keep that proportion (7/16 of the head per
    spatial axis) with every part even, as rotary pairs need: the two spatial axes get the even
    number nearest 7/16 of the head, the first axis the rest, at least 2. Example: 16 -> (4, 6, 6).
    """
    if head_dim < 6 or head_dim % 2:
        raise CheckpointError(f"attention head width {head_dim} cannot carry Flux's 3-axis rotary embedding")
    if head_dim == 128:
        return (16, 56, 56)
    spatial = 2 * round(head_dim * 7 / 32)
    while head_dim - 2 * spatial < 2:
        spatial -= 2
    return (head_dim - 2 * spatial, spatial, spatial)


@dataclass(frozen=True)
class TensorRule:
    """One checkpoint tensor and the diffusers parameters made from it.

    Several targets mean the source is split along dim 0 in that order (BFL's fused qkv and
    single-block linear1). ``swap_halves`` exchanges the two halves along dim 0: BFL's final
    adaLN emits (shift, scale), diffusers' norm_out expects (scale, shift).
    """

    source: str
    targets: tuple[str, ...]
    split_sizes: tuple[int, ...] | None = None
    swap_halves: bool = False

    def apply(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.swap_halves:
            first, second = tensor.chunk(2, dim=0)
            tensor = torch.cat([second, first], dim=0)
        if len(self.targets) == 1:
            return {self.targets[0]: tensor}
        # clone: split returns views of the fused tensor, which would share storage as parameters.
        parts = tensor.split(list(self.split_sizes), dim=0)
        return {name: part.clone() for name, part in zip(self.targets, parts)}


def bfl_to_diffusers_rules(config: dict) -> list[TensorRule]:
    """The BFL -> diffusers key table for a Flux.1 transformer of this config."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = _MLP_RATIO * width
    rules: list[TensorRule] = []

    def rename(source: str, target: str, **kw) -> None:
        for kind in ("weight", "bias"):
            rules.append(TensorRule(f"{source}.{kind}", (f"{target}.{kind}",), **kw))

    def split(source: str, targets: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        for kind in ("weight", "bias"):
            rules.append(TensorRule(f"{source}.{kind}", tuple(f"{t}.{kind}" for t in targets), sizes))

    def norm(source: str, target: str) -> None:
        # BFL's RMSNorm parameter is called scale; diffusers' is weight.
        rules.append(TensorRule(f"{source}.scale", (f"{target}.weight",)))

    embed = "time_text_embed"
    for bfl, diff in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder")) + (
        (("guidance_in", "guidance_embedder"),) if config["guidance_embeds"] else ()
    ):
        rename(f"{bfl}.in_layer", f"{embed}.{diff}.linear_1")
        rename(f"{bfl}.out_layer", f"{embed}.{diff}.linear_2")
    rename("txt_in", "context_embedder")
    rename("img_in", "x_embedder")

    for i in range(config["num_layers"]):
        src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rename(f"{src}.img_mod.lin", f"{dst}.norm1.linear")
        rename(f"{src}.txt_mod.lin", f"{dst}.norm1_context.linear")
        split(f"{src}.img_attn.qkv", tuple(f"{dst}.attn.to_{x}" for x in "qkv"), (width,) * 3)
        split(f"{src}.txt_attn.qkv", tuple(f"{dst}.attn.add_{x}_proj" for x in "qkv"), (width,) * 3)
        norm(f"{src}.img_attn.norm.query_norm", f"{dst}.attn.norm_q")
        norm(f"{src}.img_attn.norm.key_norm", f"{dst}.attn.norm_k")
        norm(f"{src}.txt_attn.norm.query_norm", f"{dst}.attn.norm_added_q")
        norm(f"{src}.txt_attn.norm.key_norm", f"{dst}.attn.norm_added_k")
        rename(f"{src}.img_attn.proj", f"{dst}.attn.to_out.0")
        rename(f"{src}.txt_attn.proj", f"{dst}.attn.to_add_out")
        rename(f"{src}.img_mlp.0", f"{dst}.ff.net.0.proj")
        rename(f"{src}.img_mlp.2", f"{dst}.ff.net.2")
        rename(f"{src}.txt_mlp.0", f"{dst}.ff_context.net.0.proj")
        rename(f"{src}.txt_mlp.2", f"{dst}.ff_context.net.2")

    for i in range(config["num_single_layers"]):
        src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rename(f"{src}.modulation.lin", f"{dst}.norm.linear")
        split(
            f"{src}.linear1",
            (f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v", f"{dst}.proj_mlp"),
            (width, width, width, mlp),
        )
        norm(f"{src}.norm.query_norm", f"{dst}.attn.norm_q")
        norm(f"{src}.norm.key_norm", f"{dst}.attn.norm_k")
        rename(f"{src}.linear2", f"{dst}.proj_out")

    rename("final_layer.linear", "proj_out")
    rename("final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves=True)
    return rules


def _detect_layout(keys: Iterable[str]) -> tuple[str, str]:
    """Return (layout, prefix) of the Flux.1 transformer among these keys, or refuse."""
    found = find_layouts(keys, _LAYOUT_SIGNATURES)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise CheckpointError(f"several Flux.1 transformers in one file (layout, prefix): {sorted(found)}")
    if not any(".double_blocks." in f".{k}" or ".transformer_blocks." in f".{k}" for k in keys):
        raise CheckpointError("not a Flux.1 transformer checkpoint: no double_blocks/transformer_blocks keys found")
    raise CheckpointError(
        "not a Flux.1 transformer checkpoint: it has transformer blocks but lacks Flux.1's embedders "
        f"(expected {' + '.join(_LAYOUT_SIGNATURES[BFL_LAYOUT])} or, in diffusers layout, "
        f"{' + '.join(_LAYOUT_SIGNATURES[DIFFUSERS_LAYOUT])}); it may be another DiT family"
    )


def _count_blocks(keys: Iterable[str], pattern: re.Pattern) -> int:
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    count = max(indices) + 1 if indices else 0
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise CheckpointError(f"block indices are not contiguous: block {missing[0]} of {pattern.pattern} is missing")
    return count


def _infer_config(source: SafetensorsSource, layout: str, prefix: str) -> dict:
    """The diffusers config, from shapes in the headers only."""
    keys = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]
    shape = lambda name: source.shape(prefix + name)  # noqa: E731
    double, single = _BLOCK_PATTERNS[layout]
    num_layers, num_single_layers = _count_blocks(keys, double), _count_blocks(keys, single)
    if layout == BFL_LAYOUT:
        img_in, final, txt_in, vector_in = "img_in.weight", "final_layer.linear.weight", "txt_in.weight", "vector_in.in_layer.weight"
        norms = ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale")
        guidance = "guidance_in.in_layer.weight"
    else:
        img_in, final, txt_in = "x_embedder.weight", "proj_out.weight", "context_embedder.weight"
        vector_in = "time_text_embed.text_embedder.linear_1.weight"
        norms = ("transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight")
        guidance = "time_text_embed.guidance_embedder.linear_1.weight"

    # The RMSNorm of the queries normalises one head, so its length is the head width.
    norm = next((n for n in norms if prefix + n in source), None)
    if norm is None:
        raise CheckpointError("Flux.1 checkpoint without any transformer block (no query norm to read the head width from)")
    width, in_channels = shape(img_in)
    (head_dim,) = shape(norm)
    if width % head_dim:
        raise CheckpointError(f"model width {width} is not a multiple of the head width {head_dim}")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shape(final)[0],  # differs from in_channels in Flux Fill (384 in, 64 out)
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": shape(txt_in)[1],
        "pooled_projection_dim": shape(vector_in)[1],
        "guidance_embeds": prefix + guidance in source,
        "axes_dims_rope": flux_axes_dims_rope(head_dim),
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """Check a diffusers folder's config.json against the shapes; take the rotary axes from it."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "FluxTransformer2DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not a FluxTransformer2DModel")
    if stored.get("out_channels") is None:
        stored["out_channels"] = stored.get("in_channels")
    for name, inferred in config.items():
        if name == "axes_dims_rope" or name not in stored:
            continue
        if stored[name] != inferred:
            raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {inferred!r}")
    merged = dict(config)
    if stored.get("axes_dims_rope") is not None:
        merged["axes_dims_rope"] = tuple(stored["axes_dims_rope"])
    if sum(merged["axes_dims_rope"]) != merged["attention_head_dim"]:
        raise CheckpointError(f"{config_path}: axes_dims_rope {merged['axes_dims_rope']} does not sum to the head width")
    return merged


def _meta_model(config: dict):
    # Built on the meta device: no memory, no weights initialised; shapes only.
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


class FluxCheckpoint(TransformerCheckpoint):
    """An opened Flux.1 checkpoint: layout, config and key table known, no weight read yet."""

    def _open(self, config_path: Path | None) -> None:
        self.layout, self.prefix = _detect_layout(self.source.keys())
        config = _infer_config(self.source, self.layout, self.prefix)
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        self.config = config
        expected = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
        self.target_shapes = expected
        if self.layout == BFL_LAYOUT:
            self.rules = bfl_to_diffusers_rules(config)
        else:
            self.rules = [TensorRule(key, (key,)) for key in expected]
        self._validate(expected)

    def _validate(self, expected: dict[str, tuple[int, ...]]) -> None:
        made = [t for rule in self.rules for t in rule.targets]
        assert sorted(made) == sorted(expected), "internal: key table and diffusers model disagree"
        refuse_key_mismatch({rule.source for rule in self.rules}, self.weight_names(),
                            f"a Flux.1 transformer ({self.layout} layout, prefix {self.prefix!r})")
        refuse_quantized(self.source, [self.prefix + rule.source for rule in self.rules])
        for rule in self.rules:
            target_shapes = [expected[t] for t in rule.targets]
            want = (sum(s[0] for s in target_shapes),) + target_shapes[0][1:]
            if self.shape(rule.source) != want:
                raise CheckpointError(f"tensor {self.prefix + rule.source!r} has shape {self.shape(rule.source)}, expected {want}")

    def locate(self, target: str) -> tuple[str, int, int]:
        """(source tensor, first row, rows) that a diffusers tensor is taken from (a run of whole rows)."""
        for rule in self.rules:
            if target in rule.targets and not rule.swap_halves:
                sizes = rule.split_sizes or (self.target_shapes[target][0],)
                index = rule.targets.index(target)
                return rule.source, sum(sizes[:index]), sizes[index]
        raise KeyError(f"internal: {target!r} is not a run of rows of one checkpoint tensor")

    def state_dict(
        self,
        dtype=torch.bfloat16,
        device: str | torch.device = "cpu",
        include: Callable[[str], bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The diffusers state dict; ``include(key)`` picks a subset (only those tensors are read)."""
        dtype = as_load_dtype(dtype)
        out: dict[str, torch.Tensor] = {}
        for rule in self.rules:
            if include is not None and not any(include(t) for t in rule.targets):
                continue
            converted = rule.apply(self._read(rule.source).to(dtype))
            for name, tensor in converted.items():
                if include is None or include(name):
                    out[name] = tensor.to(device)
        return out


def open_flux_checkpoint(path: str | Path) -> FluxCheckpoint:
    """Open and validate a Flux.1 checkpoint without reading weights (use as a context manager)."""
    return FluxCheckpoint(path)


def read_flux_config(path: str | Path) -> dict:
    """The inferred ``FluxTransformer2DModel`` config, from headers only (for early validation)."""
    with FluxCheckpoint(path) as checkpoint:
        return dict(checkpoint.config)


def flux_transformer_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], prepare=None):
    """Build the diffusers model around complete weights, without initialising any twice.

    ``prepare(meta_model) -> model`` may reshape the model before the weights are assigned (a
    PipeFusion stage drops the blocks it does not hold); the weights must then match it exactly.
    """
    model = _meta_model(config)
    if prepare is not None:
        model = prepare(model)
    return assign_weights(model, state_dict, f"FluxTransformer2DModel({config})")


def load_flux_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a Flux.1 transformer from a single file or a diffusers folder, fully offline."""
    with FluxCheckpoint(path) as checkpoint:
        state_dict = checkpoint.state_dict(dtype=dtype, device=device)
        return flux_transformer_from_state_dict(checkpoint.config, state_dict)
