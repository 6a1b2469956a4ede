"""A DiTFastAttn plan: for each attention layer and each step, how its attention is computed.

- "full":            ordinary attention.
- "window_residual": WA-RS, window attention plus the residual (full minus window attention)
                     kept from this layer's last full step.
- "share_step":      AST, this layer's output of the previous model call is reused.
- "share_cfg":       ASC, the unconditional rows reuse the conditional rows' output (full
                     attention on the conditional half only).

Layers are counted over the model's attention modules in execution order (Flux: double blocks,
then single blocks). The plan is plain data, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL, WINDOW_RESIDUAL, SHARE_STEP, SHARE_CFG = "full", "window_residual", "share_step", "share_cfg"
METHODS = (FULL, WINDOW_RESIDUAL, SHARE_STEP, SHARE_CFG)
# Which methods compute full attention (and so can refresh the window residual).
COMPUTES_FULL = (FULL, SHARE_CFG)


@dataclass(frozen=True)
class FastAttnPlan:
    methods: tuple[tuple[str, ...], ...]  # methods[layer][step]

    def __post_init__(self) -> None:
        for layer, steps in enumerate(self.methods):
            for step, method in enumerate(steps):
                if method not in METHODS:
                    raise ValueError(f"unknown DiTFastAttn method {method!r} (layer {layer}, step {step}); "
                                     f"choose one of {', '.join(METHODS)}")
            if steps and steps[0] in (SHARE_STEP, WINDOW_RESIDUAL):
                raise ValueError(f"layer {layer}: step 0 must compute attention (full or share_cfg): "
                                 "nothing is cached before it")

    @classmethod
    def all_full(cls, layers: int, steps: int) -> "FastAttnPlan":
        return cls(tuple((FULL,) * steps for _ in range(layers)))

    @classmethod
    def uniform(cls, layers: int, steps: int, method: str, every: int = 2) -> "FastAttnPlan":
        """``method`` on every ``every``-th step after step 0, full elsewhere (tests, benchmarks)."""
        row = tuple(method if step >= 1 and (step - 1) % every == 0 else FULL for step in range(steps))
        return cls(tuple(row for _ in range(layers)))

    @property
    def layers(self) -> int:
        return len(self.methods)

    @property
    def steps(self) -> int:
        return len(self.methods[0]) if self.methods else 0

    def method(self, layer: int, step: int) -> str:
        return self.methods[layer][step]

    def needs_residual(self, layer: int, step: int) -> bool:
        """Whether this full step must keep the window residual: a later step uses it before the next full one."""
        for method in self.methods[layer][step + 1:]:
            if method == WINDOW_RESIDUAL:
                return True
            if method in COMPUTES_FULL:
                return False
        return False

    def compressed_fraction(self) -> float:
        """The share of (layer, step) entries that are not plain full attention."""
        entries = [m for steps in self.methods for m in steps]
        return sum(m != FULL for m in entries) / len(entries) if entries else 0.0

    def counts(self) -> dict[str, int]:
        entries = [m for steps in self.methods for m in steps]
        return {m: entries.count(m) for m in METHODS}

    def uses(self, method: str) -> bool:
        return any(method in steps for steps in self.methods)
