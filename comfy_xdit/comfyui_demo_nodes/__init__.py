"""A ComfyUI node for tests and the demo only: Flux CONDITIONING from a seed, standing in for the text encoders.

Stock text encoders build their full-size models whatever file they get (T5-XXL is about
9.5 GB), so the tests and `comfy-xdit demo` link this folder into their own ComfyUI instead; a
user's ComfyUI never loads it (it is not the pack's top-level module). It emits the layout a stock
Flux encoder emits: [[tokens [1, T, D], {"pooled_output": [1, P], "guidance": g}]].
"""

import torch


class XditTestFluxConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "tokens": ("INT", {"default": 16, "min": 1, "max": 4096}),
                "context_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
                "pooled_dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, seed, tokens, context_dim, pooled_dim, guidance):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g)
        return ([[context, {"pooled_output": pooled, "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"XditTestFluxConditioning": XditTestFluxConditioning}
