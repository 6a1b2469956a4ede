"""The greedy choice of DiTFastAttn: per layer and step, the most compressed method within the threshold.

At the first call of each step of the calibrating job, every layer computes its full attention
output (the reference) and the output of each method that can apply there; it then takes the
first method, in the order below, whose relative L1 error
sum|candidate - full| / sum|full| is under the threshold, and full attention if none is.
The order is xDiT's (most compressed first): sharing the previous step, then window attention
with the residual, then sharing across CFG.

The error is measured on the layer's attention output (after its output projection) on the job's
own prompt and latents: that is the paper's local criterion, cheaper than its model-output loss
(xDiT reruns the whole model per candidate). With random weights the plan says nothing about
image quality; only real weights and a real prompt make it meaningful.

Every rank must pick the same method, or their plans (and, under parallelism, their later
collectives) would differ. Each rank sums the error terms over the rows it holds, the sums are
all-reduced over the data and cfg groups (the ranks holding other rows of the same model
call on one worker), and every rank decides on the same totals; float64 sums so the totals
differ from one worker's only by summation order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .plan import FULL, SHARE_CFG, SHARE_STEP, WINDOW_RESIDUAL

PREFERENCE = (SHARE_STEP, WINDOW_RESIDUAL, SHARE_CFG)


@dataclass
class CalibrationEntry:
    """One (layer, step) decision and the reduced errors it was made on."""

    layer: int
    step: int
    method: str
    errors: dict[str, float]


def _tensors(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, tuple) else [output]


@dataclass
class GreedyCalibration:
    threshold: float
    groups: list[dist.ProcessGroup] = field(default_factory=list)
    record: list[CalibrationEntry] = field(default_factory=list)

    def relative_errors(self, reference, candidates: dict) -> dict[str, float]:
        """method -> sum|candidate - reference| / sum|reference|, summed over every rank of ``groups``."""
        names = [m for m in PREFERENCE if m in candidates]
        refs = _tensors(reference)
        sums = [sum((c - r).abs().sum(dtype=torch.float64) for c, r in zip(_tensors(candidates[m]), refs)) for m in names]
        sums.append(sum(r.abs().sum(dtype=torch.float64) for r in refs))
        totals = torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in sums])
        for group in self.groups:  # over data, then cfg: the sum over their product
            dist.all_reduce(totals, group=group)
        *diffs, base = totals.tolist()
        return {m: (d / base if base else float("inf")) for m, d in zip(names, diffs)}

    def choose(self, layer: int, step: int, reference, candidates: dict) -> str:
        """The first method of PREFERENCE among ``candidates`` under the threshold, else full."""
        errors = self.relative_errors(reference, candidates) if candidates else {}
        method = next((m for m in PREFERENCE if m in errors and errors[m] < self.threshold), FULL)
        self.record.append(CalibrationEntry(layer, step, method, errors))
        return method
