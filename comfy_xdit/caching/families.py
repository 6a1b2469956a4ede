"""Which step caches each model family offers, and what they need to know about its blocks.

First-Block-Cache works on any family whose blocks diffusers' ``TransformerBlockRegistry`` knows
(it says where a block returns its image and text streams): Flux's and SD3's joint blocks,
``BasicTransformerBlock`` (PixArt, DiT; image only), Wan's ``WanTransformerBlock`` (image only),
Qwen-Image's ``QwenImageTransformerBlock`` (text, image), HunyuanVideo's dual- and single-stream
blocks, Mochi's ``MochiTransformerBlock`` and ``CogVideoXBlock`` (image, text) are all registered
there. HunyuanDiT's ``HunyuanDiTBlock`` is not; it returns the image stream only and is
registered here the same way (its long skip connections need nothing more: on a skipped step
every block after the first passes its input through, and the skip inputs go unused). What a
family adds is where its blocks find the ``SequenceLayout`` (so the metric can leave out the zero
padding of the last sequence shard). ConsisID and Latte cannot be skipped block by block
(NO_CACHE_BECAUSE says why) and refuse both caches.

TeaCache also needs the family's published rescale polynomial, fitted on the real model, and the
tensor it was fitted on. A family without a published polynomial does not offer TeaCache: a
polynomial fitted on another model maps the change of another tensor, and its skips would be
unvalidated guesses. Sources are in settings.py and the README's cache section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .settings import (
    DEFAULT_THRESHOLDS,
    FBCACHE,
    TEACACHE,
    TEACACHE_COGVIDEOX_2B,
    TEACACHE_FLUX_COEFFICIENTS,
    TEACACHE_HUNYUAN_VIDEO,
    TEACACHE_MOCHI,
    TEACACHE_WAN_1_3B,
    TEACACHE_WAN_14B,
    TEACACHE_WAN_RETAINED_STEPS,
)


@dataclass(frozen=True)
class TeaCacheRecipe:
    """One model's published TeaCache: the tensor compared between steps and how its change is read."""

    name: str  # for messages and the README
    coefficients: tuple[float, ...]  # rescale polynomial, highest power first
    default_threshold: float
    # (first block, its bound call arguments) -> the tensor whose relative L1 change is measured
    modulated_input: Callable[[torch.nn.Module, dict], torch.Tensor]
    # whether that tensor has image tokens on dim 1 (sharded under sequence parallelism); Wan's
    # timestep modulation has none and is the same on every rank
    per_token: bool = True
    retained_steps: int = 1  # the first steps always run the whole model
    last_step_runs: bool = True  # the last step always runs the whole model


@dataclass(frozen=True)
class FamilyCaches:
    # the block keyword whose dict carries the SequenceLayout (None: the blocks get no attention
    # kwargs and the layout is asked of the model's sharded forward)
    layout_kwarg: str | None
    # model config -> its TeaCache recipe; None: TeaCache is not offered, for the reason below
    teacache: Callable[[object], TeaCacheRecipe] | None = None
    no_teacache_because: str = ""

    @property
    def kinds(self) -> tuple[str, ...]:
        return (FBCACHE, TEACACHE) if self.teacache is not None else (FBCACHE,)


def _flux_modulated_input(block, arguments: dict) -> torch.Tensor:
    # the first double block's norm1 output for the image tokens, as TeaCache4FLUX measures
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


def _wan_timestep_modulation(block, arguments: dict) -> torch.Tensor:
    # the blocks' timestep modulation [B, 6, dim] (the original code's e0), which TeaCache4Wan2.1
    # measures with use_ret_steps; CogVideoX's blocks get its time embedding ``emb`` [B, D] here,
    # which TeaCache's CogVideoX experiment measures
    return arguments["temb"]


def _hunyuan_video_modulated_input(block, arguments: dict) -> torch.Tensor:
    # the first dual-stream block's norm1 output for the video tokens: TeaCache4HunyuanVideo's
    # modulated_inp (img_norm1, shifted and scaled by img_mod1), which diffusers' AdaLayerNormZero computes
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


def _mochi_modulated_input(block, arguments: dict) -> torch.Tensor:
    # the first block's norm1 output (MochiRMSNormZero), as TeaCache4Mochi measures
    return block.norm1(arguments["hidden_states"], arguments["temb"])[0]


FLUX_TEACACHE = TeaCacheRecipe("TeaCache4FLUX", TEACACHE_FLUX_COEFFICIENTS, DEFAULT_THRESHOLDS[TEACACHE],
                               _flux_modulated_input)
WAN_1_3B_TEACACHE = TeaCacheRecipe("TeaCache4Wan2.1 T2V 1.3B (use_ret_steps)", *TEACACHE_WAN_1_3B,
                                   _wan_timestep_modulation, per_token=False,
                                   retained_steps=TEACACHE_WAN_RETAINED_STEPS, last_step_runs=False)
WAN_14B_TEACACHE = TeaCacheRecipe("TeaCache4Wan2.1 T2V 14B (use_ret_steps)", *TEACACHE_WAN_14B,
                                  _wan_timestep_modulation, per_token=False,
                                  retained_steps=TEACACHE_WAN_RETAINED_STEPS, last_step_runs=False)
HUNYUAN_VIDEO_TEACACHE = TeaCacheRecipe("TeaCache4HunyuanVideo", *TEACACHE_HUNYUAN_VIDEO, _hunyuan_video_modulated_input)
MOCHI_TEACACHE = TeaCacheRecipe("TeaCache4Mochi", *TEACACHE_MOCHI, _mochi_modulated_input)
COGVIDEOX_2B_TEACACHE = TeaCacheRecipe("TeaCache's CogVideoX-2b experiment", *TEACACHE_COGVIDEOX_2B,
                                       _wan_timestep_modulation, per_token=False)
WAN_14B_WIDTH = 5120  # Wan 2.1 14B and each Wan 2.2 A14B expert; the 1.3B is 1536 wide


def _wan_teacache(config) -> TeaCacheRecipe:
    # By width: the 14B polynomial for 14B-wide models (Wan 2.2's experts share 2.1 14B's
    # architecture; the polynomial was fitted on 2.1), the 1.3B one for every other width.
    width = config.num_attention_heads * config.attention_head_dim
    return WAN_14B_TEACACHE if width == WAN_14B_WIDTH else WAN_1_3B_TEACACHE


def _cogvideox_teacache(config) -> TeaCacheRecipe:
    # CogVideoX-2b is the one with learned positional embeddings; 5b and 1.5 use rotary ones.
    from ..config import ConfigError

    if getattr(config, "patch_size_t", None) is not None:  # 1.5
        raise ConfigError("the teacache step cache is not available for CogVideoX 1.5 models yet (TeaCache4CogVideoX1.5's "
                          "polynomial is not wired in; the CogVideoX-2b one is not a fit of 1.5) (available: fbcache); "
                          "set the sampler's cache to fbcache or none")
    if config.use_rotary_positional_embeddings:
        raise ConfigError("the teacache step cache is not available for this CogVideoX model (TeaCache's CogVideoX "
                          "polynomial is fitted on CogVideoX-2b; none is published for 5b) (available: fbcache); "
                          "set the sampler's cache to fbcache or none")
    return COGVIDEOX_2B_TEACACHE


NO_POLYNOMIAL = "TeaCache has no published rescale coefficients for {}"

FAMILY_CACHES: dict[str, FamilyCaches] = {
    "flux": FamilyCaches("joint_attention_kwargs", teacache=lambda config: FLUX_TEACACHE),
    "sd3": FamilyCaches("joint_attention_kwargs", no_teacache_because=NO_POLYNOMIAL.format("SD3/SD3.5")),
    "pixart": FamilyCaches("cross_attention_kwargs", no_teacache_because=NO_POLYNOMIAL.format("PixArt-alpha/Sigma")),
    "wan": FamilyCaches(None, teacache=_wan_teacache),
    # Community ports label Flux's polynomial as Qwen-Image's "to be tuned": not a fit of this model.
    "qwen_image": FamilyCaches("joint_attention_kwargs", no_teacache_because=NO_POLYNOMIAL.format("Qwen-Image")),
    # The video families' blocks get no attention kwargs: the layout is asked of the sharded forward.
    "hunyuan_video": FamilyCaches(None, teacache=lambda config: HUNYUAN_VIDEO_TEACACHE),
    "mochi": FamilyCaches(None, teacache=lambda config: MOCHI_TEACACHE),
    "hunyuan_dit": FamilyCaches(None, no_teacache_because=NO_POLYNOMIAL.format("HunyuanDiT")),
    # Diffusers-semantics families: the job is keyed by the scheduler's timesteps (job.py).
    "dit": FamilyCaches("cross_attention_kwargs", no_teacache_because=NO_POLYNOMIAL.format("DiT-XL-2")),
    "cogvideox": FamilyCaches("attention_kwargs", teacache=_cogvideox_teacache),
}
# Families whose blocks a step cache cannot skip cleanly, and why.
NO_CACHE_BECAUSE = {
    "consisid": "ConsisID adds its face features between blocks (perceiver cross-attention), which would run on "
                "skipped steps too and be added on top of a cached residual that already holds them",
    "latte": "Latte alternates spatial and temporal blocks with the tokens regrouped between them, so the first "
             "and the last block's outputs are not in one layout to take a residual of",
}


def _register_hunyuan_dit_block() -> None:
    """Describe HunyuanDiT's block to diffusers' TransformerBlockRegistry: it returns the image stream only."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.hunyuan_transformer_2d import HunyuanDiTBlock

    TransformerBlockRegistry.register(HunyuanDiTBlock, TransformerBlockMetadata(return_hidden_states_index=0,
                                                                               return_encoder_hidden_states_index=None))


_register_hunyuan_dit_block()


def layout_reader(caches: FamilyCaches, sharded_forward=None) -> Callable[[dict], object]:
    """(a block's bound arguments) -> the SequenceLayout of the call in progress, or None (one shard)."""
    if caches.layout_kwarg is not None:
        name = caches.layout_kwarg
        return lambda arguments: (arguments.get(name) or {}).get("layout")
    if sharded_forward is None or getattr(sharded_forward, "degree", 1) == 1:
        return lambda arguments: None
    return lambda arguments: sharded_forward.current_layout()
