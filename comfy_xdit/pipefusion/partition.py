"""Which transformer blocks each PipeFusion stage holds: runs of blocks balanced by a per-block weight.

A Flux transformer is a list of N double-stream blocks followed by M single-stream blocks. The
contiguous splits choose their split points where the running weight comes closest to k/N of the
total, which keeps every stage within one block of an even share. Three splits, and "auto" (the
default) to choose among them (``SPLITS``, the config's ``pipefusion_split``):

- "parameters": each block weighs its parameter count. A double block has about 2.4x the
  parameters of a single one (36 d^2 against 15 d^2), so every GPU holds about the same weight
  memory -- PipeFusion's main point, fitting a model no single GPU holds. The stages' compute is
  uneven then: per token a double block costs the same as a single block (a token passes about
  12 d^2 of weights in both: a double block runs image tokens through the image stream's weights
  and text tokens through the text stream's), so the stages past the double blocks do most of
  the work (Flux-dev, N=2: stage 1 does about 70% of it).
- "compute": every block weighs 1, so the stages get equal block counts and about equal time per
  step; the stage holding the double blocks then holds more parameters (Flux-dev, N=2: about 2/3).
- "interleaved": both at once, with two runs of blocks per stage (virtual stages, as in
  interleaved pipeline schedules): stage k holds the k-th N-th of the double blocks and the k-th
  N-th of the single blocks. A patch passes the stages twice, double blocks on stages 0..N-1,
  then single blocks on stages 0..N-1 again, so every stage holds about 1/N of both kinds: even
  weight memory and even compute (Flux-dev, N=2: 10 double + 19 single | 9 double + 19 single).
  The price is N more hand-overs per patch (the last stage sends back to stage 0 between the
  two runs).
- "auto": interleaved where every stage can hold a double and a single block, else parameters.
  Interleaved was the fastest of the three wherever it was measured, at the same memory as the
  parameter split (docs/performance.md: 2 stages 1.15x one GPU in run X, 4.26 s against 5.02 s
  for the parameter split eager and 3.19 s against 3.72 s with Ulysses=2 and CUDA graphs in AA,
  4 stages 4.23 s against 4.79 s in AD).

Stage 0 also holds the input embedders (x_embedder, context_embedder), the last stage the output
layers (norm_out, proj_out). Every stage holds the small timestep/guidance/pooled-text embedder
(time_text_embed, about 0.3% of Flux-dev) and computes ``temb`` itself: every rank runs the
same sampler with the same timestep and conditioning, so this costs no communication and no
ordering between stages. The rotary embedding has no parameters and is computed everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PIPEFUSION_SPLITS as SPLITS
from ..config import ConfigError
from ..even_split import even_bands

DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"
INPUT_LAYERS = ("x_embedder", "context_embedder")
OUTPUT_LAYERS = ("norm_out", "proj_out")
SHARED_LAYERS = ("time_text_embed", "pos_embed")


@dataclass(frozen=True)
class StagePlan:
    """The blocks one stage holds: ``runs``, each [start, stop) in the model's block order (the
    ``doubles`` double blocks first, then the single blocks), in the order the stage runs them.

    With one run per stage (splits "parameters" and "compute") a patch passes the stages once.
    With several ("interleaved"), run r of stage k is virtual stage r * count + k: a patch goes
    through the runs of all stages in virtual-stage order, from the last stage back to stage 0
    between runs. Stage 0 holds virtual stage 0 (the input layers), the last stage the last
    virtual stage (the output layers).
    """

    index: int
    count: int
    runs: tuple[tuple[int, int], ...]
    doubles: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def virtual_stage(self, run: int) -> int:
        return run * self.count + self.index

    def run_blocks(self, run: int) -> tuple[range, range]:
        """The double and the single block numbers of one run."""
        start, stop = self.runs[run]
        return range(min(start, self.doubles), min(stop, self.doubles)), range(max(start - self.doubles, 0),
                                                                                 max(stop - self.doubles, 0))

    def holds_block(self, kind: str, number: int) -> bool:
        position = number if kind == DOUBLE else self.doubles + number
        return any(start <= position < stop for start, stop in self.runs)

    def owns(self, key: str) -> bool:
        """Whether a diffusers state-dict key belongs to this stage (what the loader reads)."""
        top = key.split(".", 1)[0]
        if top in (DOUBLE, SINGLE):
            return self.holds_block(top, int(key.split(".", 2)[1]))
        if top in INPUT_LAYERS:
            return self.is_first
        if top in OUTPUT_LAYERS:
            return self.is_last
        if top in SHARED_LAYERS:
            return True
        raise KeyError(f"internal: {key!r} is not a Flux transformer key this partition knows")


def block_parameter_counts(config: dict) -> tuple[int, int]:
    """Parameters of one double block and one single block of this Flux config (exact, from diffusers)."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    dim = config["num_attention_heads"] * config["attention_head_dim"]
    with torch.device("meta"):
        double = FluxTransformerBlock(dim, config["num_attention_heads"], config["attention_head_dim"])
        single = FluxSingleTransformerBlock(dim, config["num_attention_heads"], config["attention_head_dim"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(double), count(single)


def split_points(weights: list[int], stages: int) -> list[int]:
    """Indices where stages 1..N-1 start: each where the running sum comes closest to k/N of the total.

    Every stage gets at least one block (the caller refuses fewer blocks than stages).
    """
    total = sum(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    points = []
    for k in range(1, stages):
        target = total * k / stages
        low = (points[-1] if points else 0) + 1  # at least one block in the stage before
        high = len(weights) - (stages - k)  # leave one block for every later stage
        points.append(min(range(low, high + 1), key=lambda i: (abs(prefix[i] - target), i)))
    return points


def block_weights(config: dict, split: str) -> list[int]:
    """The weight of every block (double blocks first) that ``split`` balances over the stages."""
    if split not in SPLITS:
        raise ValueError(f"pipefusion_split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
    doubles, singles = config["num_layers"], config["num_single_layers"]
    if split == "compute":
        return [1] * (doubles + singles)
    double_params, single_params = block_parameter_counts(config)
    return [double_params] * doubles + [single_params] * singles


def resolve_split(config: dict, stages: int, split: str) -> str:
    """The split "auto" stands for with this config and stage count; any other split as given."""
    if split != "auto":
        return split
    return "interleaved" if min(config["num_layers"], config["num_single_layers"]) >= stages else "parameters"


def plan_stages(config: dict, stages: int, split: str = "auto") -> list[StagePlan]:
    """The stage plans of a Flux config for ``stages`` pipeline stages, balanced as ``split`` says."""
    doubles, singles = config["num_layers"], config["num_single_layers"]
    split = resolve_split(config, stages, split)
    if doubles + singles < stages:
        raise ValueError(f"{stages} pipeline stages need at least {stages} transformer blocks; this model has {doubles + singles}")
    if split == "interleaved":
        return _interleaved_plans(doubles, singles, stages)
    points = [0, *split_points(block_weights(config, split), stages), doubles + singles]
    return [StagePlan(index=i, count=stages, runs=((points[i], points[i + 1]),), doubles=doubles) for i in range(stages)]


def _interleaved_plans(doubles: int, singles: int, stages: int) -> list[StagePlan]:
    """Stage k: the k-th of N even runs of the double blocks, then the k-th of N of the single blocks."""
    if min(doubles, singles) < stages:
        raise ConfigError(f"pipefusion_split 'interleaved' gives each of the {stages} stages at least one double and one "
                         f"single block; this model has {doubles} double and {singles} single blocks; use 'parameters' "
                         "or 'compute'")

    def even_runs(count: int, offset: int) -> list[tuple[int, int]]:
        return [(offset + start, offset + start + size) for start, size in even_bands(count, stages)]

    double_runs, single_runs = even_runs(doubles, 0), even_runs(singles, doubles)
    return [StagePlan(index=k, count=stages, runs=(double_runs[k], single_runs[k]), doubles=doubles) for k in range(stages)]
