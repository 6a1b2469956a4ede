"""Flux's single blocks with the Ulysses all-to-all running beside their MLP (``ulysses_overlap_mlp``,
on by default wherever Ulysses runs without Ring).

A Flux single block feeds one normalised input to two independent branches, attention and an MLP
projection (3072 -> 12288 at Flux-dev size), and only then joins them. diffusers computes the MLP
first and then attention, whose q/k/v all-to-all the GPU then waits for with nothing to do: about
10 ms of every 85 ms step at ulysses=2 (docs/performance.md, run O). This forward issues the
all-to-all first (SequenceParallelAttention.start), queues the MLP behind it, and waits only when
attention needs the heads (finish).

Same modules, same operations, same order of every floating-point reduction: only the moment the
MLP is queued moves, so the result is bit-identical to diffusers' forward. Compiled, inductor would
otherwise wait right after the collective; engine.compile_repeated_blocks asks it to sink waits to
their first use (``SINK_WAITS``).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

# torch.compile options that move each collective's wait to the first use of its result.
SINK_WAITS = {"reorder_for_compute_comm_overlap": True, "reorder_for_compute_comm_overlap_passes": ["sink_waits"]}


def overlaps_collectives(config) -> bool:
    """Whether Flux under this ParallelConfig may run a Ulysses all-to-all beside other work (the
    MLP overlap, or head chunks: auto ones may still come to 1 where the heads do not divide)."""
    return (config.ulysses_degree > 1 and config.ring_degree == 1
            and (config.overlaps_mlp or config.ulysses_head_chunks != 1))


def overlap_single_blocks(model: torch.nn.Module) -> int:
    """Give each of the model's single blocks the overlapping forward; returns how many."""
    blocks = list(getattr(model, "single_transformer_blocks", ()))
    for block in blocks:
        # Per instance, not on the class: other models in the process keep diffusers' forward.
        block.forward = types.MethodType(overlapped_single_block_forward, block)
    return len(blocks)


def overlapped_single_block_forward(
    self: FluxSingleTransformerBlock,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' FluxSingleTransformerBlock.forward with the MLP queued while the all-to-all is in flight."""
    from .flux import ParallelFluxAttnProcessor, flux_query_key_value

    processor = self.attn.processor
    layout = (joint_attention_kwargs or {}).get("layout")
    if not isinstance(processor, ParallelFluxAttnProcessor) or layout is None or not processor.attention.can_overlap:
        # Another processor (or none of ours): nothing to overlap, diffusers' own order.
        return FluxSingleTransformerBlock.forward(self, hidden_states, encoder_hidden_states, temb,
                                                  image_rotary_emb, joint_attention_kwargs)
    text_tokens = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)

    query, key, value = flux_query_key_value(self.attn, norm_hidden_states, None, image_rotary_emb)
    in_flight = processor.attention.start(query, key, value, layout)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))  # runs beside the all-to-all
    attn_output = processor.attention.finish(in_flight, layout).flatten(2, 3).to(query.dtype)

    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]
