"""What a sampling request asks of the step cache, and the published defaults it falls back on.

Random weights cannot calibrate quality, so every default here is a published value (sources
in the README's cache section). First-Block-Cache's is published for Flux.1-dev only; every other
family (SD3/SD3.5, PixArt, Wan, Qwen-Image, HunyuanVideo, Mochi, HunyuanDiT, DiT-XL-2, CogVideoX)
takes it too: no family-specific threshold is published for them. TeaCache needs a rescale
polynomial fitted on the model: published for Flux.1-dev, Wan 2.1 T2V (1.3B, 14B), HunyuanVideo,
Mochi and CogVideoX-2b; caching/families.py says which family uses which.

- First-Block-Cache: residual_diff_threshold 0.08, ParaAttention's default for FLUX models
  (28 steps: 26.36 s -> 17.01 s, 1.55x, on an L20).
- TeaCache: rel_l1_thresh 0.4 (TeaCache4FLUX: 0.25 ~1.5x, 0.4 ~1.8x, 0.6 ~2.0x, 0.8 ~2.25x;
  ComfyUI-TeaCache recommends 0.4 for FLUX) with TeaCache4FLUX's rescale polynomial.
- TeaCache on Wan: TeaCache4Wan2.1 with use_ret_steps (its README: "faster generation speed and
  better generation quality"), thresholds from its table's "slow" column: T2V 1.3B 0.05
  (~97 s -> ~61 s, 1.6x, one A800), T2V 14B 0.10 (~1829 s -> ~915 s, 2.0x).
"""

from __future__ import annotations

from dataclasses import dataclass

FBCACHE = "fbcache"
TEACACHE = "teacache"
KINDS = (FBCACHE, TEACACHE)

DEFAULT_THRESHOLDS = {FBCACHE: 0.08, TEACACHE: 0.4}
# The speedups published for those defaults on FLUX.1-dev, 28 steps, one GPU (ParaAttention:
# 26.36 s -> 17.01 s; TeaCache4FLUX: "0.4 (1.8x speedup)"). The benchmark forces skip patterns
# of this density, since random weights do not produce realistic ones.
PUBLISHED_SPEEDUPS = {FBCACHE: 1.55, TEACACHE: 1.8}

# TeaCache4FLUX (ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py): the polynomial, highest power
# first, that maps the relative L1 change of the first block's modulated input to an estimate of
# the relative change of the model output.
TEACACHE_FLUX_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)

# TeaCache4Wan2.1 (ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py, use_ret_steps): the
# polynomials fitted on the blocks' timestep modulation e0 of the T2V models, each with the
# "slow" threshold of TeaCache4Wan2.1/README.md's use_ret_steps table; the first 5 steps always
# run ("retention steps"), the last one need not.
TEACACHE_WAN_1_3B = ((-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02), 0.05)
TEACACHE_WAN_14B = ((-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01), 0.10)
TEACACHE_WAN_RETAINED_STEPS = 5

# TeaCache4HunyuanVideo (ali-vilab/TeaCache, TeaCache4HunyuanVideo/teacache_sample_video.py): the
# polynomial fitted on the first dual-stream block's modulated video input (img_norm1, then
# img_mod1's shift and scale); the first and the last step always run. Thresholds from its README
# and script comment: 0.1 ~1.6x, 0.15 ~2.1x (720p 129 frames 50 steps: ~50 min -> ~30 / ~23 min,
# one A800); the script uses 0.15. We default to 0.1, the quality end, as for Wan.
TEACACHE_HUNYUAN_VIDEO = ((7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02), 0.1)
# TeaCache4Mochi (ali-vilab/TeaCache, TeaCache4Mochi/teacache_mochi.py): the polynomial fitted on the
# first block's norm1 output (the modulated video input) of diffusers' MochiTransformer3DModel; the
# first and the last step always run. Its comment: 0.06 ~1.5x, 0.09 ~2.1x (the script uses 0.09,
# 64 steps); we default to 0.06, the quality end.
# TeaCache's CogVideoX experiment (ali-vilab/TeaCache, eval/teacache/experiments/cogvideox.py, the
# paper's VBench runs on VideoSys' CogVideoXConfig, i.e. CogVideoX-2b 1.0): the polynomial fitted on
# the time embedding ``emb`` every block gets (no image tokens); the first and the last timestep
# always run; its "slow" and "fast" runs use 0.1 and 0.2. We default to 0.1 and offer it for 2b
# only (learned positional embeddings): nothing published for 5b (TeaCache4CogVideoX1.5 is 1.5's).
TEACACHE_COGVIDEOX_2B = ((-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03), 0.1)
TEACACHE_MOCHI = ((-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03), 0.06)


@dataclass(frozen=True)
class CacheSettings:
    """kind: "fbcache" or "teacache". threshold: None takes the published default; 0 never skips.

    computed_steps: force which steps run the whole model (every other step reuses the cache).
    The metric is still computed and reduced, so a forced run costs what a real one does; the
    benchmark uses it because random weights do not produce a realistic skip pattern.
    """

    kind: str
    threshold: float | None = None
    computed_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"cache {self.kind!r} is not supported; choose one of {', '.join(KINDS)} (or no cache)")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"the cache threshold must be 0 or more (0 never skips), got {self.threshold}")
        if self.computed_steps is not None and 0 not in self.computed_steps:
            raise ValueError("computed_steps must include step 0: the first step has nothing cached to reuse")

    @property
    def effective_threshold(self) -> float:
        """The threshold asked for, else the kind's Flux default (a family may publish its own: see job.py)."""
        return self.threshold_or(DEFAULT_THRESHOLDS[self.kind])

    def threshold_or(self, default: float) -> float:
        return default if self.threshold is None else float(self.threshold)

    def describe(self) -> str:
        forced = f", forced computed steps {list(self.computed_steps)}" if self.computed_steps is not None else ""
        return f"{self.kind} (threshold {self.effective_threshold:g}{forced})"


def settings_from_choice(kind: str, threshold: float, fastattn_window: int | None = None):
    """The node's and the CLI's inputs: kind "none" is off; threshold 0 takes the default.
    "ditfastattn" gives fastattn.settings.FastAttnSettings (window: its default when None)."""
    if kind in ("none", "", None):
        return None
    if kind == "ditfastattn":
        from ..fastattn.settings import FastAttnSettings

        window = {} if fastattn_window is None else {"window": fastattn_window}
        return FastAttnSettings(None if threshold == 0 else threshold, **window)
    return CacheSettings(kind, None if threshold == 0 else threshold)


def spread_computed_steps(steps: int, speedup: float) -> tuple[int, ...]:
    """A skip pattern with the published speedup: round(steps / speedup) computed steps, the first
    and last among them, the rest spread evenly. Not a recorded trace: a stand-in of the right
    density for timing, since random weights skip either everything or nothing."""
    computed = max(2, min(steps, round(steps / speedup)))
    if steps <= 2:
        return tuple(range(steps))
    return tuple(sorted({round(i * (steps - 1) / (computed - 1)) for i in range(computed)}))
