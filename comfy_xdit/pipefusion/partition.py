"""Which transformer blocks each PipeFusion stage holds: contiguous runs balanced by a per-block weight.

A Flux transformer is a list of N double-stream blocks followed by M single-stream blocks. The
split points are chosen where the running weight comes closest to k/N of the total, which keeps
every stage within one block of an even share. Two weights (``SPLITS``, the config's
``pipefusion_split``):

- "parameters": each block weighs its parameter count. A double block has about 2.4x the
  parameters of a single one (36 d^2 against 15 d^2), so every GPU holds about the same weight
  memory -- PipeFusion's main point, fitting a model no single GPU holds. The stages' compute is
  uneven then: per token a double block costs the same as a single block (a token passes about
  12 d^2 of weights in both: a double block runs image tokens through the image stream's weights
  and text tokens through the text stream's), so the stages past the double blocks do most of
  the work (Flux-dev, N=2: stage 1 does about 70% of it).
- "compute": every block weighs 1, so the stages get equal block counts and about equal time per
  step; the stage holding the double blocks then holds more parameters (Flux-dev, N=2: about 2/3).

Stage 0 also holds the input embedders (x_embedder, context_embedder), the last stage the output
layers (norm_out, proj_out). Every stage holds the small timestep/guidance/pooled-text embedder
(time_text_embed, about 0.3% of Flux-dev) and computes ``temb`` itself: every rank runs the
same sampler with the same timestep and conditioning, so this costs no communication and no
ordering between stages. The rotary embedding has no parameters and is computed everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PIPEFUSION_SPLITS as SPLITS

DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"
INPUT_LAYERS = ("x_embedder", "context_embedder")
OUTPUT_LAYERS = ("norm_out", "proj_out")
SHARED_LAYERS = ("time_text_embed", "pos_embed")


@dataclass(frozen=True)
class StagePlan:
    """The blocks of one stage: double blocks [double_start, double_stop), single likewise."""

    index: int
    count: int
    double_start: int
    double_stop: int
    single_start: int
    single_stop: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def holds_block(self, kind: str, number: int) -> bool:
        if kind == DOUBLE:
            return self.double_start <= number < self.double_stop
        return self.single_start <= number < self.single_stop

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


def plan_stages(config: dict, stages: int, split: str = "parameters") -> list[StagePlan]:
    """The stage plans of a Flux config for ``stages`` pipeline stages, balanced as ``split`` says."""
    doubles, singles = config["num_layers"], config["num_single_layers"]
    if doubles + singles < stages:
        raise ValueError(f"{stages} pipeline stages need at least {stages} transformer blocks; this model has {doubles + singles}")
    points = [0, *split_points(block_weights(config, split), stages), doubles + singles]
    plans = []
    for i in range(stages):
        start, stop = points[i], points[i + 1]
        plans.append(StagePlan(
            index=i, count=stages,
            double_start=min(start, doubles), double_stop=min(stop, doubles),
            single_start=max(start - doubles, 0), single_stop=max(stop - doubles, 0),
        ))
    return plans
