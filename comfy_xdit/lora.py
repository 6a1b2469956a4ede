"""LoRA files for Flux and SD3 / SD3.5, applied in place to a loaded diffusers transformer.

SD3 / SD3.5 key names are in ``comfy_xdit.lora_sd3``; the rest of this module (reading, applying,
restoring) is the same for both. What follows describes the Flux names.

Reading (``read_lora``): a LoRA .safetensors file (never pickle) in any of the common Flux
layouts, the ones ComfyUI 0.3.75's ``comfy.lora`` maps for Flux plus a few unprefixed spellings:

- Kohya / sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (Black Forest Labs' layer names, dots as underscores);
- BFL names with ComfyUI's prefix: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``
  (also ``lora_up``/``lora_down``, no prefix or ``model.diffusion_model.``), and ComfyUI's
  ``diffusion_model.single_blocks.N.linear1_qkv`` (the q, k, v rows of ``linear1`` only);
- diffusers / PEFT / AI-toolkit / SimpleTuner: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``
  / ``lora_B`` (with or without ``transformer.``, or ``base_model.model.``), optional ``.alpha``;
- OneTrainer ``lora_transformer_<diffusers name with underscores>``, SimpleTuner ``lycoris_...``;
- XLabs / USO ``double_blocks.0.processor.qkv_lora1.down.weight`` (converted as ComfyUI converts USO files);
- every down/up spelling ComfyUI's ``LoRAAdapter`` knows (``lora_up``/``lora_down``, ``lora_A``/``lora_B``,
  ``lora.up``/``lora.down``, ``_lora.up``/``_lora.down``, ``lora_linear_layer.up``/``.down``,
  ``lora_B.default``/``lora_A.default``), plus full-weight ``.diff`` / ``.w_norm`` and bias ``.diff_b`` /
  ``.b_norm`` patches.

Text-encoder weights in the file (``lora_te1_...``) are ignored: ComfyUI's model-only LoRA loader
ignores them as well, and the text encoders run in ComfyUI, not in the pool. LoHa, LoKr, OFT,
GLoRA, DoRA and Flux Control LoRAs are refused by name, never half-applied.

BFL files fuse q, k, v into one ``qkv`` weight and, in single blocks, q, k, v and the MLP input
into ``linear1``; diffusers keeps them apart. A LoRA on a fused layer is applied as row ranges of
the unfused diffusers weights (and BFL's final adaLN, whose halves diffusers stores swapped, as
swapped row ranges). The key table comes from the checkpoint loader's own BFL -> diffusers table.

Applying (``apply_loras``): weights are patched in place (the same tensors, so compiled graphs
and CUDA graphs see the change), computed exactly as ComfyUI's ``ModelPatcher`` does:
the original weight in float32, then per patch in order
``w += (strength * (alpha / rank)) * mm(up_f32, down_f32)`` (``alpha / rank`` is 1 without alpha),
then one cast back to the weight's dtype (round to nearest, as ComfyUI's
``stochastic_rounding`` does for bf16/fp16/fp32). For a fused layer the product is computed once on
the whole fused matrix, as ComfyUI computes it, and its rows are added to the unfused weights:
every element sees the same float operations as in ComfyUI, so the results are bit-identical.

The first time a weight is patched, a copy of the original is kept (on the CPU by default), so a
new strength, a removed LoRA or a different set restores the original bit for bit and re-applies
from it; nothing drifts over many changes. A strength of 0 is the same as leaving the LoRA out
(ComfyUI's LoraLoader skips it too).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .loading.flux import bfl_to_diffusers_rules

log = logging.getLogger(__name__)

__all__ = [
    "LoraError",
    "LoraFingerprint",
    "LoraPatch",
    "LoraPatchSet",
    "LoraState",
    "LayerTarget",
    "Segment",
    "apply_loras",
    "check_loras",
    "flux_lora_key_map",
    "lora_architecture",
    "lora_key_map",
    "lora_fingerprint",
    "lora_set_key",
    "read_lora",
]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class LoraError(ValueError):
    """A LoRA that cannot be applied to this model; the message says which file and why."""


# --------------------------------------------------------------------------------------------
# Fingerprints: a cheap identity of a LoRA file, so a pool can tell "same set" from a change.


@dataclass(frozen=True)
class LoraFingerprint:
    path: str  # absolute, symlinks resolved
    size: int
    mtime_ns: int


def lora_fingerprint(path: str | os.PathLike) -> LoraFingerprint:
    """Path + size + modification time; raises LoraError when the file is missing."""
    resolved = Path(path).expanduser().resolve()
    try:
        st = resolved.stat()
    except FileNotFoundError:
        raise LoraError(f"LoRA file not found: {path}") from None
    except OSError as error:
        raise LoraError(f"LoRA file {path}: cannot read it ({error})") from None
    if not resolved.is_file():
        raise LoraError(f"LoRA {path} is not a file")
    return LoraFingerprint(str(resolved), st.st_size, st.st_mtime_ns)


def lora_set_key(loras: Iterable[tuple[str | os.PathLike, float]]) -> tuple[tuple[LoraFingerprint, float], ...]:
    """The identity of a LoRA chain: equal keys mean equal patched weights.

    Entries with strength 0 are left out (they patch nothing); order is kept (chained LoRAs add
    up in order, and float addition is not associative).
    """
    return tuple((lora_fingerprint(p), float(s)) for p, s in loras if float(s) != 0.0)


# --------------------------------------------------------------------------------------------
# Key table: every name a LoRA file may give a Flux layer, and where that layer lives in the
# diffusers model.


@dataclass(frozen=True)
class Segment:
    """Rows ``src_start:src_start+rows`` of a (possibly fused) layer's delta go to rows
    ``dst_start:dst_start+rows`` of the diffusers parameter ``param``."""

    param: str
    dst_start: int
    src_start: int
    rows: int


@dataclass(frozen=True)
class LayerTarget:
    """A layer as LoRA files address it; ``shape`` is that (fused) layer's weight shape."""

    name: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.param for s in self.segments))


@dataclass(frozen=True)
class _KeyEntry:
    weight: LayerTarget
    bias: LayerTarget | None  # for .diff_b / .b_norm


def _model_config(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    needed = ("num_attention_heads", "attention_head_dim", "num_layers", "num_single_layers", "guidance_embeds")
    if config is None or any(k not in config for k in needed):
        raise LoraError("LoRAs can only be applied to a diffusers FluxTransformer2DModel")
    return {k: config[k] for k in needed}


def _named_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # A torch.compile'd module names its parameters "_orig_mod.<name>".
    return {n.removeprefix("_orig_mod."): p for n, p in model.named_parameters()}


def _target_from_rule(source: str, targets: tuple[str, ...], swap: bool, shapes) -> LayerTarget | None:
    if not all(t in shapes for t in targets):
        return None  # not on this rank (or not in this model)
    rest = shapes[targets[0]][1:]
    rows = sum(shapes[t][0] for t in targets)
    if swap:
        (t,) = targets
        half = rows // 2
        # BFL emits (shift, scale), diffusers (scale, shift): delta row r of BFL's layer goes to
        # diffusers row (r + half) % rows.
        segments = (Segment(t, 0, half, half), Segment(t, half, 0, half))
    else:
        segments, start = [], 0
        for t in targets:
            n = shapes[t][0]
            segments.append(Segment(t, 0, start, n))
            start += n
        segments = tuple(segments)
    return LayerTarget(source, (rows, *rest), segments)


# Names a LoRA file may use for a BFL layer name ``b`` (e.g. "double_blocks.0.img_attn.qkv").
def _bfl_spellings(b: str) -> tuple[str, ...]:
    return (f"diffusion_model.{b}", f"lora_unet_{b.replace('.', '_')}", b, f"model.diffusion_model.{b}", f"base_model.model.{b}")


# Names a LoRA file may use for a diffusers layer name ``d`` (e.g. "transformer_blocks.0.attn.to_q").
def _diffusers_spellings(d: str) -> tuple[str, ...]:
    u = d.replace(".", "_")
    return (
        f"transformer.{d}", d, f"base_model.model.{d}", f"diffusion_model.{d}",
        f"lora_transformer_{u}", f"lycoris_{u}", f"lora_unet_{u}",
    )


ARCHITECTURES = {"flux": "Flux", "sd3": "Stable Diffusion 3 / 3.5"}
# Layer names only one architecture has: a LoRA naming them is refused by name on the other.
_ARCHITECTURE_MARKERS = {
    "flux": re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]"),
    "sd3": re.compile(r"(^|[._])joint_blocks[._]"),
}


def lora_architecture(model_or_config) -> str:
    """``"flux"`` or ``"sd3"``: which key table applies to this diffusers model (or its config)."""
    config = model_or_config if isinstance(model_or_config, dict) else getattr(model_or_config, "config", None)
    if config is not None and "num_single_layers" in config and "guidance_embeds" in config:
        return "flux"
    if config is not None and "pos_embed_max_size" in config and "caption_projection_dim" in config:
        return "sd3"
    raise LoraError("LoRAs can only be applied to a diffusers FluxTransformer2DModel or SD3Transformer2DModel")


def lora_key_map(model: torch.nn.Module) -> dict[str, _KeyEntry]:
    """The key table for this model's architecture."""
    if lora_architecture(model) == "sd3":
        from .lora_sd3 import sd3_lora_key_map

        return sd3_lora_key_map(model)
    return flux_lora_key_map(model)


def _foreign_architecture(keys: Iterable[str], architecture: str) -> tuple[str, str] | None:
    """(architecture, example key) when the file names layers only another architecture has."""
    for other, marker in _ARCHITECTURE_MARKERS.items():
        if other == architecture:
            continue
        for key in keys:
            if marker.search(key):
                return other, key
    return None


def flux_lora_key_map(model: torch.nn.Module) -> dict[str, _KeyEntry]:
    """LoRA base name (the key without ``.lora_up.weight`` etc.) -> layer target in this model."""
    config = _model_config(model)
    shapes = {n: tuple(p.shape) for n, p in _named_params(model).items()}
    key_map: dict[str, _KeyEntry] = {}

    def add(names: Iterable[str], entry: _KeyEntry) -> None:
        for name in names:
            old = key_map.get(name)
            assert old is None or old == entry, f"internal: LoRA key {name} maps to two layers"
            key_map[name] = entry

    rules = {r.source: r for r in bfl_to_diffusers_rules(config)}
    for source, rule in rules.items():
        target = _target_from_rule(source, rule.targets, rule.swap_halves, shapes)
        if target is None:
            continue
        if source.endswith(".weight"):
            base = source[: -len(".weight")]
            bias_rule = rules.get(base + ".bias")
            bias = None
            if bias_rule is not None:
                bias = _target_from_rule(bias_rule.source, bias_rule.targets, bias_rule.swap_halves, shapes)
            add(_bfl_spellings(base), _KeyEntry(target, bias))
            if base.startswith("single_blocks.") and base.endswith(".linear1"):
                # ComfyUI's "linear1_qkv": a LoRA on the q, k, v rows of linear1 only.
                qkv = LayerTarget(base + "_qkv", (sum(s.rows for s in target.segments[:3]), *target.shape[1:]), target.segments[:3])
                add(_bfl_spellings(base + "_qkv"), _KeyEntry(qkv, None))
        elif source.endswith(".scale"):
            # RMSNorm scales: ComfyUI addresses them by their full name (diff patches only).
            add((f"diffusion_model.{source}", source), _KeyEntry(target, None))

    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        base = name[: -len(".weight")]
        weight = LayerTarget(base, shape, (Segment(name, 0, 0, shape[0]),))
        bias_name = base + ".bias"
        bias = LayerTarget(bias_name, shapes[bias_name], (Segment(bias_name, 0, 0, shapes[bias_name][0]),)) if bias_name in shapes else None
        add(_diffusers_spellings(base), _KeyEntry(weight, bias))
    return key_map


# --------------------------------------------------------------------------------------------
# Reading a LoRA file.

# (up, down) suffixes in the order ComfyUI's LoRAAdapter.load tries them.
_LORA_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
# Weight formats ComfyUI knows that this module does not apply: refused rather than half-applied.
_UNSUPPORTED = {
    ".hada_w1_a": "LoHa",
    ".lokr_w1": "LoKr",
    ".lokr_w1_a": "LoKr",
    ".lokr_w2": "LoKr",
    ".lokr_w2_a": "LoKr",
    ".a1.weight": "GLoRA",
    ".oft_blocks": "OFT/BOFT",
    ".dora_scale": "DoRA",
    ".lora_mid.weight": "LoCon/Tucker (lora_mid)",
    ".set_weight": "set_weight (Flux Control LoRA)",
    ".reshape_weight": "reshape_weight (Flux Control LoRA)",
}
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.", "lora_clip", "clip_l.", "t5xxl.")
_XLABS_KEY = re.compile(r"^(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora\d?\.(down|up)\.weight$")


@dataclass
class LoraPatch:
    """One patch of one layer: a low-rank pair (``up @ down``) or a full ``diff``."""

    key: str  # the base name in the file
    target: LayerTarget
    up: torch.Tensor | None = None  # [out, rank], as stored (CPU, file dtype)
    down: torch.Tensor | None = None  # [rank, in]
    alpha: float | None = None
    diff: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 without alpha (ComfyUI's rule); diff patches have no scale."""
        if self.diff is not None or self.alpha is None:
            return 1.0
        return self.alpha / self.down.shape[0]

    def delta(self, strength: float, device: torch.device, intermediate_dtype=torch.float32) -> torch.Tensor:
        """``strength * scale * (up @ down)`` (or ``strength * diff``) in float32, in ComfyUI's order."""
        if self.diff is not None:
            return strength * self.diff.to(device=device, dtype=intermediate_dtype)
        mat1 = self.up.to(device=device, dtype=intermediate_dtype)
        mat2 = self.down.to(device=device, dtype=intermediate_dtype)
        # comfy.weight_adapter.lora.LoRAAdapter.calculate_weight: alpha = v[2] / mat2.shape[0]
        alpha = self.alpha / mat2.shape[0] if self.alpha is not None else 1.0
        lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(self.target.shape)
        return (strength * alpha) * lora_diff


@dataclass
class LoraPatchSet:
    """A parsed LoRA file, mapped onto one model's diffusers parameters."""

    path: str
    fingerprint: LoraFingerprint
    patches: list[LoraPatch]
    ignored_keys: list[str] = field(default_factory=list)  # text-encoder weights
    unused_keys: list[str] = field(default_factory=list)  # keys that matched no layer

    @property
    def params(self) -> set[str]:
        return {p for patch in self.patches for p in patch.target.params}

    def __repr__(self) -> str:
        return (f"LoraPatchSet({Path(self.path).name!r}, {len(self.patches)} patches on {len(self.params)} weights, "
                f"{len(self.ignored_keys)} text-encoder keys ignored, {len(self.unused_keys)} unused keys)")


def _convert_xlabs(keys: list[str]) -> dict[str, str]:
    """XLabs/USO key -> ComfyUI's name for it (comfy.lora_convert.convert_uso_lora)."""
    out = {}
    for k in keys:
        out["diffusion_model." + (
            k.replace(".down.weight", ".lora_down.weight").replace(".up.weight", ".lora_up.weight")
            .replace(".qkv_lora2.", ".txt_attn.qkv.").replace(".qkv_lora1.", ".img_attn.qkv.")
            .replace(".proj_lora1.", ".img_attn.proj.").replace(".proj_lora2.", ".txt_attn.proj.")
            .replace(".qkv_lora.", ".linear1_qkv.").replace(".proj_lora.", ".linear2.")
            .replace(".processor.", ".")
        )] = k
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraError(
            f"LoRA {path}: only .safetensors files are read; pickle-based files ({suffix}) are refused "
            "(they can run code when loaded). Use the .safetensors release of this LoRA."
        )
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise LoraError(f"LoRA {path}: cannot read it: the file is truncated or not a safetensors file ({error})") from None


def read_lora(
    path: str | os.PathLike,
    model: torch.nn.Module,
    key_map: dict[str, _KeyEntry] | None = None,
    load_tensors: bool = True,
) -> LoraPatchSet:
    """Parse a LoRA file and map it onto ``model`` (a diffusers Flux or SD3 transformer).

    Validates everything before returning (shapes, formats, that it matches this model), so
    ``apply_loras`` never fails half-way. Tensors stay on the CPU in the file's dtype.
    ``model`` may live on the meta device: only its config and parameter shapes are used. With
    ``load_tensors=False`` only the header (and alphas) are read: a check, not something to apply.
    """
    fingerprint = lora_fingerprint(path)
    path = Path(fingerprint.path)
    shown = path.name
    handle = _open(path)
    architecture = lora_architecture(model)
    arch_name = ARCHITECTURES[architecture]
    if key_map is None:
        key_map = lora_key_map(model)

    file_keys = list(handle.keys())
    foreign = _foreign_architecture(file_keys, architecture)
    if foreign is not None:
        raise LoraError(
            f"LoRA {shown} is a {ARCHITECTURES[foreign[0]]} LoRA (it has keys such as {foreign[1]}), but the model is "
            f"{arch_name}; pick a LoRA made for {arch_name}"
        )
    # name as the lookup sees it -> name in the file
    names = {k: k for k in file_keys}
    if any(_XLABS_KEY.match(k) for k in file_keys):
        names = _convert_xlabs(file_keys)
    if any(k.endswith("img_in.lora_A.weight") for k in file_keys) and any(k.endswith("_norm.scale") for k in file_keys):
        raise LoraError(
            f"LoRA {shown} is a Flux Control LoRA (Canny/Depth): it widens the model's input for a control "
            "image, which comfy_xdit does not support; use the full Flux Canny/Depth checkpoint instead"
        )

    def shape(name: str) -> tuple[int, ...]:
        return tuple(handle.get_slice(names[name]).get_shape())

    def read(name: str) -> torch.Tensor | None:
        from safetensors import SafetensorError

        if not load_tensors and not name.endswith(".alpha"):
            return None
        try:
            return handle.get_tensor(names[name])
        except (SafetensorError, OSError) as error:
            raise LoraError(f"LoRA {shown}: cannot read tensor {names[name]!r}: the file is truncated or corrupt ({error})") from None

    def mismatch(layer: str, expected, got) -> LoraError:
        return LoraError(
            f"LoRA {shown} was made for a model of another size: layer {layer} expects {_fmt(expected)} "
            f"got {_fmt(got)}; is it a LoRA for another {arch_name} variant or another model?"
        )

    present = set(names)
    used: set[str] = set()
    patches: list[LoraPatch] = []
    for base, entry in key_map.items():
        for suffix, kind in _UNSUPPORTED.items():
            if base + suffix in present:
                raise LoraError(
                    f"LoRA {shown} uses {kind} weights (layer {base}), which comfy_xdit does not apply; "
                    "supported: plain LoRA (up/down, A/B) and diff patches"
                )
        target = entry.weight
        weight_patch = None
        for up_suffix, down_suffix in _LORA_SUFFIXES:
            if base + up_suffix in present:
                up_name, down_name = base + up_suffix, base + down_suffix
                if down_name not in present:
                    raise LoraError(f"LoRA {shown}: {names[up_name]} has no matching {names.get(down_name, down_name)}; the file is incomplete")
                up_shape, down_shape = shape(up_name), shape(down_name)
                if len(up_shape) != 2 or len(down_shape) != 2:
                    raise LoraError(f"LoRA {shown}: layer {base} has {len(up_shape)}-D LoRA weights; only LoRAs on linear (2-D) layers are applied")
                if up_shape[1] != down_shape[0]:
                    raise LoraError(f"LoRA {shown}: layer {base} has up {_fmt(up_shape)} and down {_fmt(down_shape)} of different ranks; the file is corrupt")
                got = (up_shape[0], down_shape[1])
                if got != tuple(target.shape):
                    raise mismatch(base, target.shape, got)
                alpha = None
                if base + ".alpha" in present:
                    alpha = read(base + ".alpha").item()
                    used.add(base + ".alpha")
                weight_patch = LoraPatch(base, target, up=read(up_name), down=read(down_name), alpha=alpha)
                used.update((up_name, down_name))
                break
        # Later kinds override earlier ones for the same layer, as in comfy.lora.load_lora.
        for suffix in (".w_norm", ".diff"):
            if base + suffix in present:
                got = shape(base + suffix)
                if got != tuple(target.shape):
                    raise mismatch(base, target.shape, got)
                weight_patch = LoraPatch(base, target, diff=read(base + suffix))
                used.add(base + suffix)
        if weight_patch is not None:
            patches.append(weight_patch)
        for suffix in (".b_norm", ".diff_b"):
            if base + suffix in present:
                if entry.bias is None:
                    raise LoraError(f"LoRA {shown}: {names[base + suffix]} patches a bias that layer {base} does not have")
                got = shape(base + suffix)
                if got != tuple(entry.bias.shape):
                    raise mismatch(base + ".bias", entry.bias.shape, got)
                patches.append(LoraPatch(base + ".bias", entry.bias, diff=read(base + suffix)))
                used.add(base + suffix)

    left = [k for k in names if k not in used]
    ignored = [names[k] for k in left if names[k].startswith(_TEXT_ENCODER_PREFIXES)]
    unused = [names[k] for k in left if not names[k].startswith(_TEXT_ENCODER_PREFIXES)]
    if not patches:
        sample = ", ".join(sorted(file_keys)[:3])
        if ignored and not unused:
            raise LoraError(
                f"LoRA {shown} holds only text-encoder weights ({len(ignored)} keys such as {ignored[0]}); it matches "
                f"none of this {arch_name} model's layers, and the parallel LoRA loader patches the diffusion model only"
            )
        raise LoraError(
            f"LoRA {shown} matches none of this {arch_name} model's layers; is it a LoRA for another model? "
            f"(its keys look like: {sample})"
        )
    if ignored:
        log.info("LoRA %s: %d text-encoder keys ignored (the diffusion model is patched only)", shown, len(ignored))
    if unused:
        log.warning("LoRA %s: %d keys match no layer of this model and are not applied (first: %s)",
                    shown, len(unused), ", ".join(unused[:5]))
    return LoraPatchSet(str(path), fingerprint, patches, ignored, unused)


def _strength(path, strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise LoraError(f"LoRA {path}: strength {strength!r} is not a number") from None
    if not math.isfinite(value):
        raise LoraError(f"LoRA {path}: strength {strength} is not a finite number")
    return value


def check_loras(loras: Sequence[tuple[str | os.PathLike, float]], model_or_config) -> list[LoraPatchSet]:
    """Refuse a bad LoRA chain before any weight is read or any GPU is touched.

    ``model_or_config``: the loaded model, or the diffusers config of the checkpoint (e.g.
    ``comfy_xdit.loading.read_flux_config(path)`` or ``read_sd3_config``, read from headers only);
    a config is turned into a model on the meta device. Reads only the LoRA files' headers.
    Raises LoraError.
    """
    model = model_or_config
    if isinstance(model_or_config, dict):
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        cls = SD3Transformer2DModel if lora_architecture(model_or_config) == "sd3" else FluxTransformer2DModel
        with torch.device("meta"):
            model = cls(**model_or_config)
    key_map = lora_key_map(model)
    out = []
    for path, strength in loras:
        _strength(path, strength)
        out.append(read_lora(path, model, key_map=key_map, load_tensors=False))
    return out


# --------------------------------------------------------------------------------------------
# Applying a chain of LoRAs in place.


@dataclass
class LoraState:
    """What one loaded model has applied, and the original weights to restore from.

    ``backup_device``: where original weights are kept (default CPU, as ComfyUI keeps them on
    its offload device); ``None`` keeps them on the weight's own device (fast, costs its memory).
    Call ``forget()`` after loading a new base model into the same state.
    """

    backup_device: str | torch.device | None = "cpu"
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: tuple[tuple[LoraFingerprint, float], ...] = ()
    patch_sets: dict[LoraFingerprint, LoraPatchSet] = field(default_factory=dict)
    apply_count: int = 0  # how many times weights were actually rewritten
    model_id: int | None = None  # the model the originals belong to

    def forget(self) -> None:
        """Drop everything (the model these originals belong to is gone)."""
        self.originals.clear()
        self.patch_sets.clear()
        self.applied = ()
        self.model_id = None


def apply_loras(model: torch.nn.Module, loras: Sequence[tuple[str | os.PathLike, float]], state: LoraState,
                shards=None) -> bool:
    """Make ``model``'s weights equal to the originals patched with ``loras`` in order.

    ``loras``: ``[(path, strength), ...]``; an empty list restores the original weights. Every
    file is read and checked against the model before any weight changes, so a bad LoRA leaves
    the model as it was. Returns False when the requested chain is already applied (same files,
    unchanged on disk, same strengths), True when weights were rewritten.

    ``shards`` (a tensor-parallel ``ShardedView``): ``model`` holds slices of some weights; the
    LoRA is mapped onto the whole model's shapes, and each split weight gets this rank's slice of
    its whole delta.
    """
    whole = shards.whole if shards is not None else model
    if state.model_id is not None and state.model_id != id(model):
        state.forget()  # another model: its weights are the originals now
    chain: list[tuple[LoraPatchSet, float]] = []
    key_map = None
    for path, strength in loras:
        strength = _strength(path, strength)
        fingerprint = lora_fingerprint(path)
        if strength == 0.0:
            continue
        patch_set = state.patch_sets.get(fingerprint)
        if patch_set is None:
            if key_map is None:
                key_map = lora_key_map(whole)
            patch_set = read_lora(path, whole, key_map=key_map)
        chain.append((patch_set, strength))
    requested = tuple((ps.fingerprint, s) for ps, s in chain)
    state.patch_sets = {ps.fingerprint: ps for ps, _ in chain}  # keep only the current chain in memory
    if requested == state.applied:
        return False

    params = _named_params(model)
    # param -> [(delta id, segment)], in chain order, then file order
    contributions: dict[str, list[tuple[int, Segment]]] = {}
    deltas: list[tuple[LoraPatch, float]] = []
    for patch_set, strength in chain:
        for patch in patch_set.patches:
            index = len(deltas)
            deltas.append((patch, strength))
            for segment in patch.target.segments:
                if segment.param in params:
                    contributions.setdefault(segment.param, []).append((index, segment))
    remaining = [0] * len(deltas)
    for items in contributions.values():
        for index, _ in items:
            remaining[index] += 1

    # Until this call finishes the weights match no recorded chain: if it fails half-way (out of
    # memory), the next call rewrites every weight it touched from the originals.
    state.applied = (("<incomplete>", 0.0),)
    state.model_id = id(model)
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        # Restore weights the new chain leaves alone.
        for name in [n for n in state.originals if n not in contributions]:
            params[name].data.copy_(state.originals.pop(name))
        # Patch in model order, so the parts of one fused layer are processed close together and
        # its delta (computed once) is dropped soon.
        for name, param in params.items():
            items = contributions.get(name)
            if not items:
                continue
            original = state.originals.get(name)
            if original is None:  # first touch: the weight itself is the original
                device = param.device if state.backup_device is None else torch.device(state.backup_device)
                state.originals[name] = param.detach().to(device=device, copy=True)
                original = param.detach()
            # ModelPatcher.patch_weight_to_device: the weight in float32, patched, cast back.
            weight = original.to(device=param.device).to(torch.float32, copy=True)
            split = shards is not None and shards.is_split(name)
            # A split weight: the deltas add up at the whole shape, then this rank takes its slice.
            target = torch.zeros(shards.shape(name), dtype=torch.float32, device=param.device) if split else weight
            for index, segment in items:
                delta = cache.get(index)
                if delta is None:
                    patch, strength = deltas[index]
                    delta = cache[index] = patch.delta(strength, param.device)
                target[segment.dst_start:segment.dst_start + segment.rows] += delta[segment.src_start:segment.src_start + segment.rows]
                remaining[index] -= 1
                if remaining[index] == 0:
                    del cache[index]
            if split:
                weight += shards.local(name, target)
            param.data.copy_(weight.to(param.dtype))
    state.applied = requested
    state.apply_count += 1
    return True
