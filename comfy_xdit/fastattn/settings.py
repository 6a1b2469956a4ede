"""What a sampling request asks of DiTFastAttn, and its defaults.

Random weights cannot calibrate quality, so the defaults below are not tuned here:
- window 64: the window xDiT's DiTFastAttn uses by default (``window_size = 64``, attended on
  both sides of each token).
- threshold 0.1: ours. xDiT's threshold (default 0.5) bounds a different quantity (the mean
  relative error of the whole model output, scaled by the layer's depth); ours bounds the relative
  L1 error of one attention layer's output (sum|candidate - full| / sum|full|), so the numbers do
  not translate. Lower it if images change visibly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import FastAttnPlan

DITFASTATTN = "ditfastattn"
DEFAULT_THRESHOLD = 0.1
DEFAULT_WINDOW = 64


@dataclass(frozen=True)
class FastAttnSettings:
    """threshold: None takes the default; 0 keeps every attention full (nothing is within 0 error).

    window: tokens on each side of a token that window attention sees (WA-RS).
    share_cfg: whether calibration may choose attention sharing across CFG (ASC); needs the two
    CFG branches in one model call, so it is never chosen under cfg parallel.
    plan: a fixed plan instead of calibrating (tests and benchmarks).
    """

    threshold: float | None = None
    window: int = DEFAULT_WINDOW
    share_cfg: bool = True
    plan: FastAttnPlan | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"the DiTFastAttn threshold must be 0 or more (0 keeps every attention full), got {self.threshold}")
        if self.window < 1:
            raise ValueError(f"the DiTFastAttn window must be at least 1 token, got {self.window}")

    @property
    def kind(self) -> str:
        """Read by the step cache's dispatch (caching.job.cache_job_for), like CacheSettings.kind."""
        return DITFASTATTN

    @property
    def effective_threshold(self) -> float:
        return DEFAULT_THRESHOLD if self.threshold is None else float(self.threshold)

    def describe(self) -> str:
        fixed = ", fixed plan" if self.plan is not None else ""
        return f"ditfastattn (threshold {self.effective_threshold:g}, window {self.window}{fixed})"
