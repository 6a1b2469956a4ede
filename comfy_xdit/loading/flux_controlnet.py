"""Flux ControlNet files, read offline into diffusers' ``FluxControlNetModel``.

Two layouts are what users keep in ComfyUI's models/controlnet (the ones ComfyUI 0.3.75's
``comfy.controlnet`` loads for Flux):

- InstantX / Shakker-Labs (diffusers ``FluxControlNetModel`` keys: ``controlnet_x_embedder``,
  ``transformer_blocks.N``, ``controlnet_blocks.N``, ...), including the Union models
  (``controlnet_mode_embedder``) and the inpainting variant whose control latent carries a mask
  channel (``controlnet_x_embedder`` takes 17 x 4 inputs). The control image is VAE-encoded.
- XLabs (Black Forest Labs' block names: ``double_blocks.N``, ``controlnet_blocks.N``,
  ``pos_embed_input``, ``input_hint_block``): the control image enters as pixels through a small
  convolution stack (``input_hint_block``) kept beside the diffusers model.

Both become a diffusers ``FluxControlNetModel``; the XLabs key names go through the
checkpoint loader's BFL -> diffusers table. Other ControlNets (SD1.5/SDXL UNet ControlNets,
SD3, Qwen-Image, Mistoline, Control-LoRA) are refused by name before any weight is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_files import ClosesSource, as_load_dtype, refuse_key_mismatch
from .flux import TensorRule, bfl_to_diffusers_rules, flux_axes_dims_rope
from .safetensors_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, CheckpointError, SafetensorsSource

INSTANTX = "instantx"
XLABS = "xlabs"

# Keys that identify ControlNets of other families, with what to tell the user.
_FOREIGN = (
    ("controlnet_cond_embedding.conv_in.weight", "a UNet ControlNet for SD1.5/SDXL (diffusers layout)"),
    ("zero_convs.0.0.weight", "a UNet ControlNet for SD1.5/SDXL"),
    ("control_model.zero_convs.0.0.weight", "a UNet ControlNet for SD1.5/SDXL"),
    ("lora_controlnet", "a Control-LoRA for SDXL"),
    ("after_proj_list.18.bias", "a HunyuanDiT ControlNet"),
    ("pos_embed_input.proj.weight", "an SD3 ControlNet"),
    ("transformer_blocks.0.img_mlp.net.0.proj.weight", "a Qwen-Image ControlNet"),
    ("controlnet_blocks.0.linear.weight", "a Mistoline Flux ControlNet (not supported yet)"),
    ("input_hint_block.conv_in.weight", "a diffusers Flux ControlNet with a pixel hint encoder (ComfyUI does not load it either)"),
)
_SUPPORTED = "Flux ControlNets in the InstantX/Shakker-Labs (diffusers) or XLabs layout"
_HINT_CONVS = 8  # XLabs' input_hint_block: 8 convolutions with a SiLU between each (Sequential indices 0, 2, ..., 14)
MAIN_DOUBLE_BLOCKS, MAIN_SINGLE_BLOCKS = 19, 38  # ComfyUI sizes every Flux ControlNet's output for Flux.1


class ControlNetError(CheckpointError):
    """A ControlNet file that cannot be used here; the message names the file and why."""


@dataclass(frozen=True)
class ControlNetFingerprint:
    """Path + size + modification time: equal fingerprints mean the loaded weights can be reused."""

    path: str
    size: int
    mtime_ns: int


def controlnet_fingerprint(path: str | os.PathLike) -> ControlNetFingerprint:
    resolved = Path(path).expanduser().resolve()
    try:
        st = resolved.stat()
    except OSError as error:
        raise ControlNetError(f"ControlNet file {path}: cannot read it ({error})") from None
    return ControlNetFingerprint(str(resolved), st.st_size, st.st_mtime_ns)


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    count = max(indices) + 1 if indices else 0
    if set(range(count)) != indices:
        raise ControlNetError(f"block indices of {pattern} are not contiguous")
    return count


class FluxControlNetFile(ClosesSource):
    """An opened, validated Flux ControlNet file: kind and config known, no weight read yet."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        suffix = self.path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ControlNetError(f"{self.path}: only .safetensors ControlNets are read (pickle files can run code)")
        if suffix not in SAFETENSORS_SUFFIXES:
            raise ControlNetError(f"{self.path}: expected a .safetensors ControlNet file")
        self.source = SafetensorsSource([self.path])
        try:
            keys = set(self.source.keys())
            self.kind = self._detect(keys)
            self.config, self.rules, self.hint_keys = self._layout(keys)
            self._validate(keys)
        except CheckpointError as error:
            self.source.close()
            message = str(error)
            raise ControlNetError(message if str(self.path) in message else f"{self.path}: {message}") from None

    # --- what it is ------------------------------------------------------------------------

    @staticmethod
    def _detect(keys: set[str]) -> str:
        for key, what in _FOREIGN:
            if key in keys:
                raise ControlNetError(f"this is {what}, not a Flux ControlNet; use {_SUPPORTED}")
        if "controlnet_blocks.0.weight" in keys:
            if "controlnet_x_embedder.weight" in keys and "x_embedder.weight" in keys:
                return INSTANTX
            if "double_blocks.0.img_attn.norm.key_norm.scale" in keys and "pos_embed_input.weight" in keys:
                return XLABS
        if any(k.startswith(("double_blocks.", "transformer_blocks.", "model.diffusion_model.")) for k in keys):
            raise ControlNetError(f"this is a model or LoRA file, not a ControlNet; use {_SUPPORTED}")
        raise ControlNetError(f"not a ControlNet this pack recognises; use {_SUPPORTED}")

    def _layout(self, keys: set[str]):
        shape = self.source.shape
        if self.kind == INSTANTX:
            width, in_channels = shape("x_embedder.weight")
            norm = "transformer_blocks.0.attn.norm_q.weight"
            txt_in, vec_in = "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"
            guidance = "time_text_embed.guidance_embedder.linear_1.weight" in keys
            double, single = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
            cond_in = shape("controlnet_x_embedder.weight")[1]
        else:
            width, in_channels = shape("img_in.weight")
            norm = "double_blocks.0.img_attn.norm.query_norm.scale"
            txt_in, vec_in = "txt_in.weight", "vector_in.in_layer.weight"
            guidance = "guidance_in.in_layer.weight" in keys
            double, single = r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\."
            cond_in = shape("pos_embed_input.weight")[1]
        (head_dim,) = shape(norm)
        if width % head_dim:
            raise ControlNetError(f"width {width} is not a multiple of the head width {head_dim}")
        num_layers = _count(keys, double)
        if num_layers == 0:
            raise ControlNetError("the ControlNet has no double blocks (ComfyUI needs at least one)")
        config = {
            "patch_size": 1,
            "in_channels": in_channels,
            "num_layers": num_layers,
            "num_single_layers": _count(keys, single),
            "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim,
            "joint_attention_dim": shape(txt_in)[1],
            "pooled_projection_dim": shape(vec_in)[1],
            "guidance_embeds": guidance,
            "axes_dims_rope": flux_axes_dims_rope(head_dim),
            "num_mode": shape("controlnet_mode_embedder.weight")[0] if "controlnet_mode_embedder.weight" in keys else None,
        }
        self.cond_channels = cond_in
        if self.kind == INSTANTX:
            rules = [TensorRule(k, (k,)) for k in _expected_shapes(config, cond_in)]
            return config, rules, ()
        # XLabs: BFL names through the checkpoint loader's table (no final layer in a ControlNet).
        bfl = [r for r in bfl_to_diffusers_rules(config) if not r.source.startswith("final_layer.")
               and not r.targets[0].startswith(("proj_out.", "norm_out."))]
        extra = [TensorRule(f"controlnet_blocks.{i}.{p}", (f"controlnet_blocks.{i}.{p}",))
                 for i in range(config["num_layers"]) for p in ("weight", "bias")]
        extra += [TensorRule(f"controlnet_single_blocks.{i}.{p}", (f"controlnet_single_blocks.{i}.{p}",))
                  for i in range(config["num_single_layers"]) for p in ("weight", "bias")]
        extra += [TensorRule(f"pos_embed_input.{p}", (f"controlnet_x_embedder.{p}",)) for p in ("weight", "bias")]
        hint_keys = tuple(f"input_hint_block.{2 * i}.{p}" for i in range(_HINT_CONVS) for p in ("weight", "bias"))
        return config, bfl + extra, hint_keys

    def _validate(self, keys: set[str]) -> None:
        expected = _expected_shapes(self.config, self.cond_channels)
        made = {t for rule in self.rules for t in rule.targets}
        if made != set(expected):
            raise ControlNetError(f"internal: key table and FluxControlNetModel disagree ({sorted(made ^ set(expected))[:5]})")
        wanted = {rule.source for rule in self.rules} | set(self.hint_keys)
        refuse_key_mismatch(wanted, keys, f"a Flux ControlNet ({self.kind} layout)", error=ControlNetError)
        for rule in self.rules:
            want = [expected[t] for t in rule.targets]
            total = (sum(s[0] for s in want),) + want[0][1:]
            if self.source.shape(rule.source) != total:
                raise ControlNetError(f"tensor {rule.source!r} has shape {self.source.shape(rule.source)}, expected {total}")

    # --- facts the nodes and the engine need -------------------------------------------------

    @property
    def needs_vae(self) -> bool:
        """InstantX ControlNets take a VAE-encoded control image; XLabs take pixels."""
        return self.kind == INSTANTX

    @property
    def mask_channel(self) -> bool:
        """The inpainting variant: the control latent gets a mask channel (ComfyUI fills it with ones)."""
        return self.kind == INSTANTX and self.cond_channels == 17 * 4

    def check_fits(self, model_config: dict) -> None:
        """Refuse a ControlNet made for another transformer (width, text or pooled sizes)."""
        mine = self.config
        width = mine["num_attention_heads"] * mine["attention_head_dim"]
        theirs = model_config["num_attention_heads"] * model_config["attention_head_dim"]
        for what, a, b in (("width", width, theirs), ("text width", mine["joint_attention_dim"], model_config["joint_attention_dim"]),
                           ("pooled width", mine["pooled_projection_dim"], model_config["pooled_projection_dim"]),
                           ("latent input", mine["in_channels"], model_config["in_channels"])):
            if a != b:
                raise ControlNetError(f"{self.path}: this ControlNet's {what} is {a} but the model's is {b}: "
                                      "it was made for another model; use a ControlNet for this Flux model")

    def read(self, dtype, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(diffusers state dict, XLabs hint-encoder state dict) in ``dtype``."""
        dtype = as_load_dtype(dtype)
        state = {}
        for rule in self.rules:
            for name, tensor in rule.apply(self.source.get(rule.source).to(dtype)).items():
                state[name] = tensor.to(device)
        hint = {k.removeprefix("input_hint_block."): self.source.get(k).to(dtype).to(device) for k in self.hint_keys}
        return state, hint


def _meta_controlnet(config: dict, cond_channels: int):
    from diffusers import FluxControlNetModel

    with torch.device("meta"):
        model = FluxControlNetModel(**config)
        if cond_channels != config["in_channels"]:  # the inpainting variant's mask channel
            width = config["num_attention_heads"] * config["attention_head_dim"]
            model.controlnet_x_embedder = torch.nn.Linear(cond_channels, width)
    return model


def _expected_shapes(config: dict, cond_channels: int) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_controlnet(config, cond_channels).state_dict().items()}


def xlabs_hint_encoder() -> torch.nn.Sequential:
    """XLabs' pixel hint encoder: 3 -> 16 channels, 8x smaller (stride 2 at convs 3, 5, 7)."""
    layers: list[torch.nn.Module] = []
    for i in range(_HINT_CONVS):
        layers.append(torch.nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1, stride=2 if i in (2, 4, 6) else 1))
        if i + 1 < _HINT_CONVS:
            layers.append(torch.nn.SiLU())
    return torch.nn.Sequential(*layers)


@dataclass
class LoadedControlNet:
    model: torch.nn.Module  # diffusers FluxControlNetModel
    kind: str
    hint_encoder: torch.nn.Module | None  # XLabs only
    config: dict


def load_flux_controlnet(path: str | os.PathLike, dtype=torch.bfloat16, device="cpu") -> LoadedControlNet:
    with FluxControlNetFile(path) as file:
        state, hint = file.read(dtype, device)
        model = _meta_controlnet(file.config, file.cond_channels)
        model.load_state_dict(state, strict=True, assign=True)
        encoder = None
        if hint:
            with torch.device("meta"):
                encoder = xlabs_hint_encoder()
            encoder.load_state_dict(hint, strict=True, assign=True)
            encoder.eval()
        return LoadedControlNet(model.eval(), file.kind, encoder, dict(file.config))


def read_controlnet_info(path: str | os.PathLike) -> dict:
    """Header facts for the nodes: kind, whether it needs a VAE, union modes, config."""
    with FluxControlNetFile(path) as file:
        return {"kind": file.kind, "needs_vae": file.needs_vae, "mask_channel": file.mask_channel,
                "num_modes": file.config["num_mode"] or 0, "config": dict(file.config)}


def check_controlnet_fits(path: str | os.PathLike, model_config: dict) -> None:
    with FluxControlNetFile(path) as file:
        file.check_fits(model_config)
