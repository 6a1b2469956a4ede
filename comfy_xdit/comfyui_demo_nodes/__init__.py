"""ComfyUI nodes for tests and the demo only: CONDITIONING from a seed, standing in for the text encoders.

Stock text encoders build their full-size models whatever file they get (T5-XXL is about
9.5 GB), so the tests and `comfy-xdit demo` link this folder into their own ComfyUI instead; a
user's ComfyUI never loads it (it is not the pack's top-level module). They emit the layouts the
stock encoders emit: Flux [[tokens [1, T, D], {"pooled_output": [1, P], "guidance": g}]]; SD3
(TripleCLIPLoader + CLIPTextEncode) [[tokens [1, T, D], {"pooled_output": [1, P]}]], where a real
encoder gives T = 77 + 256 and D = 4096 (CLIP-L/G padded) and P = 2048.
"""

import torch


class _SeededConditioning:
    """What every node here shares: a seed input, one CONDITIONING output, the "testing" category;
    each node adds its own inputs (INPUTS) and its ``encode``."""

    INPUTS: dict = {}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}), **cls.INPUTS}}


class XditTestFluxConditioning(_SeededConditioning):
    INPUTS = {
        "tokens": ("INT", {"default": 16, "min": 1, "max": 4096}),
        "context_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
        "pooled_dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
        "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
    }

    def encode(self, seed, tokens, context_dim, pooled_dim, guidance):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g)
        return ([[context, {"pooled_output": pooled, "guidance": guidance}]],)


class XditTestSD3Conditioning(_SeededConditioning):
    INPUTS = {
        "tokens": ("INT", {"default": 333, "min": 1, "max": 4096}),
        "context_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
        "pooled_dim": ("INT", {"default": 2048, "min": 1, "max": 8192}),
    }

    def encode(self, seed, tokens, context_dim, pooled_dim):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g)
        return ([[context, {"pooled_output": pooled}]],)


class XditTestPixArtConditioning(_SeededConditioning):
    """PixArt's layout (CLIPLoader type pixart + CLIPTextEncode): T5 tokens only, no pooled output."""

    INPUTS = {
        "tokens": ("INT", {"default": 120, "min": 1, "max": 4096}),
        "context_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
    }

    def encode(self, seed, tokens, context_dim):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, context_dim, generator=g), {}]],)


class XditTestWanConditioning(_SeededConditioning):
    """Wan's layout (CLIPLoader type wan + CLIPTextEncode): umt5 tokens, pooled_output None."""

    INPUTS = {
        "tokens": ("INT", {"default": 512, "min": 1, "max": 4096}),
        "context_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
    }

    def encode(self, seed, tokens, context_dim):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, context_dim, generator=g), {"pooled_output": None}]],)


class XditTestMochiConditioning(_SeededConditioning):
    """Mochi's layout (CLIPLoader type mochi + CLIPTextEncode): T5 tokens padded to at least 256 with an attention
    mask (long, 1 for the prompt's tokens, 0 for the padding), pooled_output None. As from stock T5, the padded
    positions carry values of their own (ComfyUI does not zero them), so a reader that kept them would change
    the result; the prompt's tokens depend only on (seed, tokens), not on the padding."""

    INPUTS = {
        "tokens": ("INT", {"default": 16, "min": 1, "max": 4096}),
        "context_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
        "padded_tokens": ("INT", {"default": 256, "min": 0, "max": 4096}),
    }

    def encode(self, seed, tokens, context_dim, padded_tokens):
        prompt = torch.randn(1, tokens, context_dim, generator=torch.Generator().manual_seed(seed))
        padding = 3 * torch.randn(1, max(padded_tokens - tokens, 0), context_dim, generator=torch.Generator().manual_seed(seed + 1))
        mask = torch.cat([torch.ones(1, tokens, dtype=torch.long), torch.zeros(1, padding.shape[1], dtype=torch.long)], dim=1)
        return ([[torch.cat([prompt, padding], dim=1), {"pooled_output": None, "attention_mask": mask}]],)


class XditTestHunyuanDiTConditioning(_SeededConditioning):
    """HunyuanDiT's layout (the checkpoint's CLIP + CLIPTextEncode): 77 BERT tokens with their mask and
    BERT pooled output, 256 mT5-XL tokens and their mask in the extras; the last ``padded`` tokens of
    each are masked, as the stock encoders pad a short prompt."""

    INPUTS = {
        "padded": ("INT", {"default": 60, "min": 0, "max": 76}),
        "context_dim": ("INT", {"default": 1024, "min": 1, "max": 8192}),
        "t5_dim": ("INT", {"default": 2048, "min": 1, "max": 8192}),
    }

    def encode(self, seed, padded, context_dim, t5_dim):
        g = torch.Generator().manual_seed(seed)
        mask, mask_t5 = torch.ones(1, 77, dtype=torch.long), torch.ones(1, 256, dtype=torch.long)
        mask[:, 77 - padded:], mask_t5[:, 256 - padded:] = 0, 0
        extras = {"pooled_output": torch.randn(1, context_dim, generator=g), "attention_mask": mask,
                  "conditioning_mt5xl": torch.randn(1, 256, t5_dim, generator=g), "attention_mask_mt5xl": mask_t5}
        return ([[torch.randn(1, 77, context_dim, generator=g), extras]],)


NODE_CLASS_MAPPINGS = {"XditTestFluxConditioning": XditTestFluxConditioning, "XditTestSD3Conditioning": XditTestSD3Conditioning,
                       "XditTestPixArtConditioning": XditTestPixArtConditioning, "XditTestWanConditioning": XditTestWanConditioning,
                       "XditTestMochiConditioning": XditTestMochiConditioning,
                       "XditTestHunyuanDiTConditioning": XditTestHunyuanDiTConditioning}
