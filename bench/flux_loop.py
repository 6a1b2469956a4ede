"""Time the 28-step Flux-dev denoising loop: plain diffusers, ours (RankEngine), xDiT (xfuser).

Real-size FluxTransformer2DModel (19 double + 38 single blocks, 24 heads x 128, guidance
embedder), random weights drawn on the device from a fixed seed (speed does not depend on weight
values; every rank and every implementation gets the same weights), bf16, 1024x1024 image
(4096 image tokens), 512 text tokens. Only the denoising loop is timed: no text encoders, no VAE.

One GPU (plain python):
    python bench/flux_loop.py --impl diffusers,ours
Two GPUs (each --degrees entry is one row; one process per GPU):
    torchrun --nproc-per-node 2 bench/flux_loop.py --impl ours --degrees u2,r2
    torchrun --nproc-per-node 2 bench/flux_loop.py --impl xdit --degrees u2 --compile --eager-baseline
    torchrun --nproc-per-node 2 bench/flux_loop.py --impl diffusers-cp --degrees u2 --compile --eager-baseline
CPU dry run (tiny config, gloo; xdit needs a GPU; diffusers-cp runs ulysses only on CPU):
    python bench/flux_loop.py --device cpu --tiny --impl diffusers,ours --steps 2 --runs 1
    torchrun --nproc-per-node 2 bench/flux_loop.py --device cpu --tiny --impl ours --degrees u2,r2 --steps 2 --runs 1
    torchrun --nproc-per-node 2 bench/flux_loop.py --device cpu --tiny --impl ours --degrees t2 --steps 2 --runs 1
    torchrun --nproc-per-node 2 bench/flux_loop.py --device cpu --tiny --impl diffusers-cp --degrees u2 --steps 2 --runs 1

Where the host waits for the GPU (CUDA's sync debug mode, counted by call site; GPUs only):
    python bench/flux_loop.py --tiny --impl diffusers,ours --steps 4 --runs 1 --sync-steps 4

diffusers-cp is diffusers' own context parallelism (ModelMixin.enable_parallelism with a
ContextParallelConfig) on the plain FluxTransformer2DModel, driven by the same loop as the 1-GPU
diffusers row; each of its rows also records vs_1gpu_rel, the final latents' relative difference
from the same model's one-GPU loop run on each rank before parallelism was enabled.

Each row: one warm-up loop, then --runs timed loops (device synchronised, ranks barriered);
the reported time is the median over runs of the slowest rank. Rows are appended as JSON lines
to --json; a readable line per row goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# diffusers' FluxTransformer2DModel defaults are Flux.1-dev's shape; only guidance_embeds differs.
FULL_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,  # two of each kind: PipeFusion's interleaved split gives each of 2 stages one of each
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# set-up


def parse_degrees(text: str) -> tuple[int, int, int, int, int]:
    """(ulysses, ring, pipefusion, tensor, distrifusion): 'u2' -> (2, 1, 1, 1, 1), 'r2' -> (1, 2, 1, 1, 1),
    'u2r2' -> (2, 2, 1, 1, 1), 'p2' (PipeFusion) -> (1, 1, 2, 1, 1), 't2' (tensor parallel) -> (1, 1, 1, 2, 1),
    'd2' (DistriFusion) -> (1, 1, 1, 1, 2), '1' -> (1, 1, 1, 1, 1)."""
    degrees = {"u": 1, "r": 1, "p": 1, "t": 1, "d": 1}
    rest = text.strip().lower()
    if rest in ("1", "u1", "r1", "u1r1", ""):
        return 1, 1, 1, 1, 1
    import re

    found = re.findall(r"([urptd])(\d+)", rest)
    for key, value in found:
        degrees[key] = int(value)
    if "".join(f"{k}{v}" for k, v in found) != rest:
        raise SystemExit(f"cannot read degrees {text!r}; write e.g. u2, r2, u2r2, p2, p2u2, t2, d2")
    return degrees["u"], degrees["r"], degrees["p"], degrees["t"], degrees["d"]


def world() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def log(msg: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device: torch.device) -> None:
    if dist.is_initialized():
        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def init_weights(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Fill a to_empty'd model: linear weights N(0, 0.02), biases 0, norm scales 1. Deterministic
    per seed on one device kind, identical on every rank (the same Philox stream)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            raise RuntimeError(f"unexpected buffer {name} in the Flux transformer; initialise it explicitly")


def build_model(cls, config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = cls(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    init_weights(model, device, seed)
    return model.eval().requires_grad_(False)


def build_stage(config: dict, degrees: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int,
                split: str = "auto") -> torch.nn.Module:
    """This rank's PipeFusion stage of the transformer, split as ``split`` says (the engine's
    pipefusion_split), with random weights (ranks are pipefusion-major inside a data=cfg=1 mesh:
    rank // (ulysses * ring) is the stage)."""
    from diffusers import FluxTransformer2DModel

    from comfy_xdit.pipefusion.partition import plan_stages
    from comfy_xdit.pipefusion.stage import cut_to_stage

    u, r, p, *_ = degrees
    plan = plan_stages(config, p, split)[(dist.get_rank() if dist.is_initialized() else 0) // (u * r)]
    with torch.device("meta"):
        model = cut_to_stage(FluxTransformer2DModel(**config), plan)
    model = model.to(dtype=dtype).to_empty(device=device)
    init_weights(model, device, seed)
    return model.eval().requires_grad_(False)


def build_tensor_parallel(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """This rank's tensor-parallel slice of the transformer (every rank of the world is one tensor group),
    with random weights: split on the meta device first, so the rank never holds the whole model, as the
    loader does."""
    from diffusers import FluxTransformer2DModel

    from comfy_xdit.models.tensor_parallel import FLUX_PLAN, shard_model

    with torch.device("meta"):
        model = shard_model(FluxTransformer2DModel(**config), FLUX_PLAN, dist.group.WORLD)
    model = model.to(dtype=dtype).to_empty(device=device)
    init_weights(model, device, seed)
    return model.eval().requires_grad_(False)


# diffusers' attention backend for its context-parallel rows. Its ring attention merges partial
# results by their log-sum-exp, which the native SDPA backend does not return; on GPUs the cuDNN
# SDPA backend does (flash-attn is not installed), and it serves ulysses as well. The CPU dry run
# can only use the native backend, so it runs ulysses only.
DIFFUSERS_CP_BACKENDS = {"cuda": "_native_cudnn", "cpu": "native"}


def enable_diffusers_context_parallel(model: torch.nn.Module, degrees: tuple[int, ...], device: torch.device) -> None:
    """diffusers' own context parallelism on a plain FluxTransformer2DModel: the model's _cp_plan
    splits the image and text tokens over the ranks and gathers proj_out's output, and the attention
    backend runs Ulysses all-to-all or ring attention. Call once per model (diffusers refuses twice),
    after the attention backend is set."""
    from diffusers import ContextParallelConfig

    u, r, p, t, d = degrees
    if p > 1 or t > 1 or d > 1:
        raise SystemExit("diffusers-cp rows are ulysses and/or ring degrees only (u<N>, r<M>, u<N>r<M>)")
    if r > 1 and device.type != "cuda":
        raise SystemExit("diffusers-cp: ring degrees need GPUs (diffusers' ring attention needs the log-sum-exp, which "
                         "its native CPU backend does not return); on CPU use ulysses degrees (u2)")
    config = ContextParallelConfig(ulysses_degree=u, ring_degree=r)
    if device.type == "cuda":
        model.enable_parallelism(config=config)
        return
    # diffusers 0.42.1 picks each rank's device as rank % torch.accelerator.device_count(), which is a
    # division by zero on a machine without an accelerator: for the CPU dry run only, it counts one
    # (the device it then records is "cpu", which is where everything is anyway).
    from unittest import mock

    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=config)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def make_inputs(args, config: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Random text conditioning, the same on every rank (CPU generator, fixed seed)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    context = torch.randn(1, args.text_len, config["joint_attention_dim"], generator=gen)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=gen)
    return {"context": context, "pooled": pooled}


def flops_per_forward(config: dict, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one transformer forward (multiply-add = 2): blocks' linears and attention,
    plus the embedders and output projection; norms, RoPE and elementwise work not counted."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s = image_tokens + text_tokens
    double = 2 * (12 * d * d) * s + 4 * s * s * d  # two streams: qkv+out (4d^2) + mlp (8d^2) each
    single = 2 * (12 * d * d) * s + 4 * s * s * d  # qkv (3d^2) + mlp up (4d^2) + proj_out (5d^2)
    embed = 2 * image_tokens * config["in_channels"] * d + 2 * text_tokens * config["joint_attention_dim"] * d
    out = 2 * image_tokens * d * config["in_channels"]
    return config["num_layers"] * double + config["num_single_layers"] * single + embed + out


# --------------------------------------------------------------------------------------------
# the loops


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents: [B, C, H, W] -> [B, (H/2)(W/2), C*4]."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids for a [h, w] grid of packed tokens."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class DiffusersLoop:
    """What FluxPipeline.__call__ does between encode_prompt and the VAE: prepare latents, set the
    flow-match Euler scheduler's timesteps, call the transformer once per step, scheduler.step."""

    def __init__(self, model, args, inputs, device, dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model, self.args, self.device, self.dtype = model, args, device, dtype
        # FLUX.1-dev's scheduler config.
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
        # encode_prompt output lives on the device in the transformer's dtype.
        self.prompt_embeds = inputs["context"].to(device, dtype)
        self.pooled = inputs["pooled"].to(device, dtype)
        self.text_ids = torch.zeros(args.text_len, 3, device=device, dtype=dtype)

    @torch.no_grad()  # as FluxPipeline.__call__
    def __call__(self, steps: int) -> torch.Tensor:
        import numpy as np

        args, device, dtype = self.args, self.device, self.dtype
        lh, lw = 2 * (args.height // 16), 2 * (args.width // 16)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        latents = torch.randn(1, 16, lh, lw, generator=gen, device=device, dtype=dtype)
        latents = pack_latents(latents)
        img_ids = latent_image_ids(lh // 2, lw // 2, device, dtype)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(latents.shape[1])
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        timesteps = self.scheduler.timesteps
        guidance = torch.full([1], 3.5, device=device, dtype=torch.float32).expand(latents.shape[0])
        self.scheduler.set_begin_index(0)
        cache_context = getattr(self.model, "cache_context", None)
        for t in timesteps:
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            kwargs = dict(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=self.pooled,
                encoder_hidden_states=self.prompt_embeds,
                txt_ids=self.text_ids,
                img_ids=img_ids,
                joint_attention_kwargs={},
                return_dict=False,
            )
            if cache_context is not None:
                with cache_context("cond"):
                    noise_pred = self.model(**kwargs)[0]
            else:
                noise_pred = self.model(**kwargs)[0]
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        self.last = latents
        return latents


def ours_parallel_config(args, degrees, device):
    """The ParallelConfig of an ours row: its degrees and the launch's options."""
    from comfy_xdit.config import ParallelConfig

    u, r, p, t, d = degrees
    n = u * r * p * t * d
    devices = tuple(f"cuda:{i}" for i in range(n)) if device.type == "cuda" else ("cpu",) * n
    return ParallelConfig(ulysses_degree=u, ring_degree=r, pipefusion_parallel_degree=p, tensor_parallel_degree=t,
                          distrifusion_degree=d, devices=devices, num_pipeline_patches=args.pipeline_patches,
                          warmup_steps=args.pipefusion_warmup, attention_backend=args.attention_backend,
                          pipefusion_split=args.pipefusion_split,
                          # Ulysses rows only, so one --extra can serve a group's 1-GPU launch too
                          ulysses_head_chunks=args.ulysses_head_chunks if u > 1 else None,
                          ulysses_overlap_mlp=args.ulysses_overlap_mlp if u > 1 else None)


def ulysses_overlap_label(config, heads: int) -> str:
    """The Ulysses overlaps an ours row runs with, resolved as the engine resolves them (Flux)."""
    from comfy_xdit.attention.usp import resolve_head_chunks

    if config.ulysses_degree == 1:
        return ""
    chunks = resolve_head_chunks(config.ulysses_head_chunks, heads, config.ulysses_degree, config.ring_degree)
    return (f" head-chunks={chunks}" if chunks > 1 else "") + (" overlap-mlp" if config.overlaps_mlp else "")


class OursLoop:
    """RankEngine.sample with a KSampler request (euler, simple, cfg 1: one forward per step).
    The conditioning stays on the CPU, as the worker pool hands it over."""

    def __init__(self, model, args, inputs, device, dtype, degrees, cond="cpu", cache=None):
        from comfy_xdit.engine import RankEngine
        from comfy_xdit.mesh import ParallelMesh
        from comfy_xdit.requests import FluxConditioning, ModelSpec

        config = ours_parallel_config(args, degrees, device)
        self.mesh = ParallelMesh.build(config, device)
        self.engine = RankEngine(self.mesh)
        dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
        self.engine.set_model(model, ModelSpec(path="<random weights>", family="flux", dtype=dtype_name,
                                               cuda_graphs=args.cuda_graphs))
        cond_device = device if cond == "device" else torch.device("cpu")
        self.positive = FluxConditioning(inputs["context"].to(cond_device), inputs["pooled"].to(cond_device), 3.5)
        self.args = args
        self.cache = cache  # CacheSettings or None
        self.last = None  # the latents of the last loop

    def __call__(self, steps: int) -> torch.Tensor:
        from comfy_xdit.requests import SampleRequest

        a = self.args
        latent = torch.zeros(1, 16, a.height // 8, a.width // 8)
        request = SampleRequest(latent=latent, positive=self.positive, negative=None, seed=a.seed, steps=steps, cfg=1.0,
                                cache=self.cache)
        self.last = self.engine.sample(request)
        return self.last


# --compile-autotune: what torch.compile's mode "max-autotune-no-cudagraphs" sets (a mode cannot be
# combined with options, and the overlaps need options): inductor benchmarks Triton GEMM templates,
# which can fuse the pointwise work around a GEMM, against cuBLAS for each shape.
AUTOTUNE_OPTIONS = {"max_autotune": True, "coordinate_descent_tuning": True}


def repeated_block_compile_options(args, impls, degrees_list, device) -> dict:
    """Keyword arguments for compile_repeated_blocks: the engine's options for ours' rows (waits
    sunk for the overlaps), plus inductor's autotuning with --compile-autotune (every row alike)."""
    options = {}
    if "ours" in impls:
        from comfy_xdit.engine import compile_options

        for degrees in degrees_list:
            options.update(compile_options(ours_parallel_config(args, degrees, device), "flux"))
    if args.compile_autotune:
        options["options"] = {**options.get("options", {}), **AUTOTUNE_OPTIONS}
    return options


def graphs_against_eager(loop, steps: int) -> float | None:
    """With CUDA graphs: relative difference max|graphs - eager| / max|eager| of one loop of an
    ours loop (anything with .engine and a __call__(steps) returning the latents). The USP path
    wraps the denoiser's forward in a CudaGraphForward; PipeFusion graphs each stage pass behind
    its denoiser's use_cuda_graphs switch."""
    from comfy_xdit.cuda_graphs import CudaGraphForward

    denoiser = loop.engine._denoiser
    if getattr(denoiser, "use_cuda_graphs", False):
        with_graphs = loop(steps)
        denoiser.use_cuda_graphs = False
        try:
            eager = loop(steps)
        finally:
            denoiser.use_cuda_graphs = True
        return float((with_graphs - eager).abs().max() / eager.abs().max())
    graphed = getattr(denoiser, "forward", None)
    if not isinstance(graphed, CudaGraphForward):
        return None
    with_graphs = loop(steps)
    denoiser.forward = graphed.forward
    try:
        eager = loop(steps)
    finally:
        denoiser.forward = graphed
    return float((with_graphs - eager).abs().max() / eager.abs().max())


CACHE_ROWS = ("none", "fbcache", "teacache", "fbcache-forced", "teacache-forced",
              "ditfastattn", "ditfastattn-share", "ditfastattn-window")


def cache_settings(name: str, steps: int, config: dict):
    """A --cache entry: none, the cache at its published default threshold, or "-forced": the
    published speedup's density of computed steps (random weights skip all or nothing).
    DiTFastAttn: "ditfastattn" calibrates its plan at the default threshold on the warm-up loop
    (the timed loops reuse it); "-share" and "-window" fix a plan that uses attention sharing
    across steps (AST) or window attention with residual (WA-RS) in every layer on every other
    step after the first, full attention elsewhere: what each method costs or saves when used."""
    from comfy_xdit.caching.settings import PUBLISHED_SPEEDUPS, CacheSettings, spread_computed_steps
    from comfy_xdit.fastattn.plan import SHARE_STEP, WINDOW_RESIDUAL, FastAttnPlan
    from comfy_xdit.fastattn.settings import FastAttnSettings

    if name not in CACHE_ROWS:
        raise SystemExit(f"--cache takes {', '.join(CACHE_ROWS)}; got {name!r}")
    if name == "none":
        return None
    if name.startswith("ditfastattn"):
        layers = config["num_layers"] + config["num_single_layers"]
        fixed = {"ditfastattn-share": SHARE_STEP, "ditfastattn-window": WINDOW_RESIDUAL}.get(name)
        return FastAttnSettings(plan=FastAttnPlan.uniform(layers, steps, fixed) if fixed else None)
    kind, _, forced = name.partition("-")
    if forced:
        return CacheSettings(kind, computed_steps=spread_computed_steps(steps, PUBLISHED_SPEEDUPS[kind]))
    return CacheSettings(kind)


class FluxPipelineStub:
    """What xfuser's DiTRuntimeState reads from a pipeline: the transformer's config and the VAE
    scale (the class name must start with 'Flux' for its token-grid arithmetic)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.vae_scale_factor = 8



def setup_xdit(args, config, device, dtype, degrees):
    """xfuser 0.7.0's Flux path without PipeFusion, as its runner builds it
    (xfuser/model_executor/models/runner_models/flux.py): a plain diffusers FluxPipeline around
    xFuserFlux1Transformer2DWrapper, which splits the image tokens (and the text tokens, when they
    divide) over the sequence-parallel group and runs USP attention. The loop around it is
    therefore DiffusersLoop."""
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import get_runtime_state, init_distributed_environment, initialize_runtime_state
    from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

    u, r, p, t, d = degrees
    if p > 1 or t > 1 or d > 1:
        raise SystemExit("xdit rows here are USP only (xfuser's Flux pipeline runs PipeFusion synchronously only)")
    init_distributed_environment()
    xargs = xFuserArgs(
        model="random-weights-flux-dev",
        ulysses_degree=u,
        ring_degree=r,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        max_sequence_length=args.text_len,
        warmup_steps=1,
        use_torch_compile=args.compile,
    )
    engine_config, _ = xargs.create_config()
    model = build_model(xFuserFlux1Transformer2DWrapper, config, device, dtype, args.seed)
    initialize_runtime_state(FluxPipelineStub(model), engine_config)
    state = get_runtime_state()
    # As xfuser's Flux runner does before each call (split_text_embed_in_sp: no PipeFusion).
    state.set_input_parameters(
        height=args.height,
        width=args.width,
        batch_size=1,
        num_inference_steps=args.steps,
        max_condition_sequence_length=args.text_len,
        split_text_embed_in_sp=True,
    )
    info = {"xfuser_attention_backend": getattr(state.attention_backend, "name", str(state.attention_backend))}
    return model, info


# The torch.compile mode xfuser 0.7.0's Flux runner asks for on NVIDIA GPUs without a step cache
# (xFuserFluxModel._get_compile_mode): inductor with CUDA graphs.
XFUSER_FLUX_COMPILE_MODE = "reduce-overhead"


def compile_like_xfuser(model: torch.nn.Module) -> torch.nn.Module:
    """What xfuser 0.7.0's runner does for use_torch_compile on Flux without PipeFusion, FSDP or a step
    cache (xFuserModel._compile_model in runner_models/base_model.py): turn on inductor's
    compute/communication reordering with the three passes torch used by default before 2.10
    (its _enable_compute_comm_overlap), then torch.compile the whole transformer in the Flux runner's
    mode, with torch's default dynamic. The runner's 2-step compile warm-up is covered by the row's
    warm-up loop."""
    enable_comm_overlap_reordering()
    return torch.compile(model, mode=XFUSER_FLUX_COMPILE_MODE)


def enable_comm_overlap_reordering() -> None:
    """Inductor's compute/communication reordering with the passes xfuser 0.7.0 turns on."""
    torch._inductor.config.reorder_for_compute_comm_overlap = True
    torch._inductor.config.reorder_for_compute_comm_overlap_passes = [
        "reorder_compute_for_overlap", "sink_waits", "raise_comms"]


# --------------------------------------------------------------------------------------------
# timing


def gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def time_loop(loop, args, device, label: str) -> dict:
    return time_loops([loop], args, device, [label])[0]


def time_loops(loops: list, args, device, labels: list[str]) -> list[dict]:
    """Warm each loop up, then time --runs rounds of one run per loop. Several loops take their
    runs in turn (A B A B ...), so a card that slows as it heats weighs on every row alike instead
    of on the rows timed last (--interleave); their peak memory is then the launch's, shared."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_s = []  # each loop's first warm-up
    for loop in loops:
        for i in range(args.warmup):
            barrier(device)
            t0 = time.perf_counter()
            loop(args.steps)
            sync(device)
            if i == 0:
                compile_s.append(time.perf_counter() - t0)
    outs, times, starts = [None] * len(loops), [[] for _ in loops], [[] for _ in loops]
    for _ in range(args.runs):
        for i, loop in enumerate(loops):
            barrier(device)
            sync(device)
            t0 = time.perf_counter()
            outs[i] = loop(args.steps)
            sync(device)
            times[i].append(time.perf_counter() - t0)
            starts[i].append(t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0
    rows = []
    for i, label in enumerate(labels):
        finite = bool(torch.isfinite(outs[i].float()).all()) if outs[i] is not None else None
        per_rank = gather_objects({"times": times[i], "peak_gib": peak, "reserved_gib": reserved, "finite": finite})
        slowest = [max(r["times"][run] for r in per_rank) for run in range(len(times[i]))]
        row = {
            "label": label,
            "times": slowest,
            "median_s": statistics.median(slowest),
            "min_s": min(slowest),
            "warmup_s": compile_s[i] if compile_s else None,
            "peak_gib_per_rank": [round(r["peak_gib"], 2) for r in per_rank],
            "reserved_gib_per_rank": [round(r["reserved_gib"], 2) for r in per_rank],
            "finite": all(r["finite"] is not False for r in per_rank),
        }
        if len(loops) > 1:
            # rank 0's clock, from the first timed run: shows the turns
            row.update(interleaved=True, run_starts_s=[round(t - starts[0][0], 4) for t in starts[i]])
        rows.append(row)
    return rows


KERNEL_GROUPS = (
    ("nccl", ("nccl",)),
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa", "cudnn_generated")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "wgmma", "splitk")),
    ("copy/cat", ("copy", "cat", "memcpy", "memset")),
)


def profile_loop(loop, args, device, label: str) -> str:
    """One --profile-steps loop under torch.profiler: device time per kernel group and the top
    kernels, per rank. Returns this rank's text."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    barrier(device)
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        loop(args.profile_steps)
        sync(device)
    wall = time.perf_counter() - t0
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.profile_out:  # the whole timeline too, for the GPU's idle gaps (bench/trace_gaps.py)
        Path(args.profile_out).mkdir(parents=True, exist_ok=True)
        trace_name = label.replace(" ", "_").replace("=", "") + f"_rank{rank}.json.gz"
        prof.export_chrome_trace(str(Path(args.profile_out) / trace_name))  # torch gzips a .gz path
    groups: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = evt.self_cuda_time_total
        if us <= 0:
            continue
        name = evt.key
        if name.startswith("nccl:"):
            continue  # the profiler's annotation of a collective, not a kernel: counted once below
        low = name.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + us
        kernels.append((us, evt.count, name))
    steps = args.profile_steps
    lines = [f"== profile {label} rank {rank}: {steps} steps, wall {wall:.3f} s under the profiler ({wall / steps * 1000:.1f} ms/step)"]
    total = sum(groups.values())
    lines.append(f"   device kernel time {total / 1e3 / steps:.1f} ms/step (kernels on all streams summed)")
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"   {g:10s} {us / 1e3 / steps:8.2f} ms/step  {100 * us / max(total, 1):5.1f}%")
    lines.append("   top kernels (ms/step, calls/step, name):")
    for us, count, name in sorted(kernels, reverse=True)[:18]:
        lines.append(f"   {us / 1e3 / steps:8.2f} {count / steps:7.1f}  {name[:110]}")
    cpu_top = sorted(
        (e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU),
        key=lambda e: -e.self_cpu_time_total,
    )[:8]
    lines.append("   top host ops by self CPU time (ms/step, calls/step):")
    for e in cpu_top:
        lines.append(f"   {e.self_cpu_time_total / 1e3 / steps:8.2f} {e.count / steps:7.1f}  {e.key[:100]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from comfy_xdit.config import PIPEFUSION_SPLITS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="diffusers,ours", help="comma list of diffusers, ours, xdit; or diffusers-tp alone "
                   "(diffusers' own DTensor tensor parallel over all the launched GPUs, --degrees t<N>); or diffusers-cp "
                   "alone (diffusers' own context parallelism, one --degrees row: u<N>, r<M> or u<N>r<M>)")
    p.add_argument("--degrees", default=None, help="comma list of u<N>r<M> rows for ours/xdit (default: the world size as ulysses)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 (float32 with --device cpu)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny Flux (2 + 2 blocks, width 64) for dry runs")
    p.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks (diffusers, diffusers-cp, "
                   "ours); xdit: torch.compile the whole transformer as xfuser's runner does (mode reduce-overhead)")
    p.add_argument("--comm-overlap", action="store_true",
                   help="with --compile (diffusers, ours): inductor's compute/communication reordering, as xfuser's compile sets it")
    p.add_argument("--compile-autotune", action="store_true",
                   help="with --compile: inductor autotunes GEMMs (Triton templates against cuBLAS), as mode "
                        "max-autotune-no-cudagraphs; every compiled row of the launch alike (not xdit, diffusers-cp)")
    p.add_argument("--cuda-graphs", action="store_true", help="ours: replay each forward as a captured CUDA graph")
    p.add_argument("--interleave", action="store_true",
                   help="time the launch's diffusers and ours rows in turn, one run each per round (against clock drift)")
    p.add_argument("--eager-baseline", action="store_true", help="with --compile: time diffusers (or diffusers-cp, "
                   "or xdit) eager first, in the same process")
    p.add_argument("--cond", default="cpu", help="comma list of cpu, device: where ours gets the conditioning (the pool hands over CPU tensors); one ours row per entry")
    p.add_argument("--profile-steps", type=int, default=0, help="after timing, profile a loop of this many steps")
    p.add_argument("--profile-out", default=None, help="directory for per-rank profile summaries and gzipped "
                   "chrome traces (bench/trace_gaps.py reads them)")
    p.add_argument("--sync-steps", type=int, default=0,
                   help="after timing, run a loop of this many steps with CUDA's sync debug mode on and print where "
                        "the host waited for the GPU (bench/host_syncs.py); GPUs only")
    p.add_argument("--json", default=None, help="append one JSON line per row here (rank 0)")
    p.add_argument("--tag", default="", help="free text stored with each row")
    p.add_argument("--attention-backend", default="auto", help="ours: ParallelConfig.attention_backend (auto, cudnn, flash, ...)")
    p.add_argument("--pipeline-patches", type=int, default=None, help="PipeFusion rows: patches M (default: the degree)")
    p.add_argument("--pipefusion-warmup", type=int, default=1,
                   help="PipeFusion and DistriFusion (d<N>) rows: synchronous warmup steps")
    p.add_argument("--pipefusion-split", choices=list(PIPEFUSION_SPLITS), default="auto",
                   help="PipeFusion rows: stages of even parameter memory, of even block count (even compute), or both "
                        "(interleaved: two runs of blocks per stage); auto (the engine's default): interleaved where every "
                        "stage can hold a double and a single block, else parameters")
    p.add_argument("--cache", default=None, help="ours rows with step caches, comma list of " + ", ".join(CACHE_ROWS) +
                   " (give none first: the others' latents are compared with it)")
    p.add_argument("--ulysses-head-chunks", type=int, default=None,
                   help="ours: ParallelConfig.ulysses_head_chunks (Ulysses all-to-alls in head chunks, pipelined with "
                        "attention; default: the engine's choice, 1 turns it off)")
    p.add_argument("--ulysses-overlap-mlp", action=argparse.BooleanOptionalAction, default=None,
                   help="ours: ParallelConfig.ulysses_overlap_mlp (each single block's all-to-all beside its MLP; "
                        "default: the engine's choice)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    for impl in impls:
        if impl not in ("diffusers", "ours", "xdit", "diffusers-tp", "diffusers-cp"):
            raise SystemExit(f"unknown --impl {impl!r}")
    if "diffusers-cp" in impls and (len(impls) > 1 or world()[1] < 2):
        raise SystemExit("diffusers-cp: run it alone, under torchrun with as many processes as its --degrees")
    if "diffusers-tp" in impls and (len(impls) > 1 or args.compile or args.device != "cuda"):
        raise SystemExit("diffusers-tp: run it alone, eager, on GPUs (diffusers' tensor parallel refuses CPU devices)")
    if args.compile_autotune and (not args.compile or {"xdit", "diffusers-cp"} & set(impls)):
        raise SystemExit("--compile-autotune: with --compile, for diffusers and ours rows (xdit and diffusers-cp "
                         "compile their own way)")
    if "xdit" in impls and len(impls) > 1:
        raise SystemExit("xdit owns the process's distributed state: run it alone")
    if args.sync_steps and args.device != "cuda":
        raise SystemExit("--sync-steps: CUDA's sync debug mode needs GPUs")
    rank, world_size, local_rank = world()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --device cpu --tiny for a dry run")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    config = TINY_CONFIG if args.tiny else FULL_CONFIG
    if args.tiny and args.height == 1024:
        args.height = args.width = 64
        if args.text_len == 512:
            args.text_len = 8
    degrees_list = [parse_degrees(d) for d in (args.degrees.split(",") if args.degrees else [f"u{world_size}"])]
    for u, r, p, t, d in degrees_list:
        if u * r * p * t * d != world_size:
            raise SystemExit(f"degrees u{u}r{r}p{p}t{t}d{d} need {u * r * p * t * d} processes; this run has {world_size}")
    if "diffusers" in impls and world_size != 1:
        raise SystemExit("the diffusers baseline runs on one GPU: launch it without torchrun")

    if world_size > 1 and "xdit" not in impls and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)

    import diffusers

    image_tokens = (args.height // 16) * (args.width // 16)
    flops = flops_per_forward(config, image_tokens, args.text_len) * args.steps
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world_size,
    }
    try:
        import yunchang  # noqa: F401
        from importlib.metadata import version

        env["yunchang"] = version("yunchang")
        env["xfuser"] = version("xfuser") if "xdit" in impls else None
    except Exception:
        pass
    log(f"# flux loop: {json.dumps(env)} image_tokens={image_tokens} text={args.text_len} steps={args.steps} "
        f"{flops / 1e12:.1f} TFLOP per loop, cudnn sdp enabled={torch.backends.cuda.cudnn_sdp_enabled()}")

    rows = []
    inputs = make_inputs(args, config, device, dtype)
    profiles = []

    compiled_now = False

    def run_row(loop, impl, degrees, extra=None, after=None, timing=None):
        u, r, p, t, d = (*degrees, 1, 1)[:5]
        graphs = impl == "ours" and args.cuda_graphs
        label = f"{impl} u{u}r{r}{f'p{p}' if p > 1 else ''}{f't{t}' if t > 1 else ''}{f'd{d}' if d > 1 else ''}{' compiled' if compiled_now else ''}{' autotuned' if compiled_now and args.compile_autotune else ''}{' cuda-graphs' if graphs else ''}"
        if compiled_now and args.comm_overlap and impl != "xdit":
            label += " comm-overlap"
            extra = {**(extra or {}), "comm_overlap": True}
        if impl == "ours" and p == 1 and d == 1:
            overlaps = ulysses_overlap_label(ours_parallel_config(args, (u, r, p, t, d), device),
                                             config["num_attention_heads"])
            if overlaps:
                label += overlaps
                extra = {**(extra or {}), "ulysses_overlaps": overlaps.strip()}
        if extra and extra.get("cond") == "device":
            label += " cond-on-device"
        if extra and extra.get("cache"):
            label += f" cache={extra['cache']}"
        from comfy_xdit.pipefusion.partition import resolve_split

        split = resolve_split(config, p, args.pipefusion_split) if p > 1 else None
        if split not in (None, "parameters"):
            label += f" {split}-split"
        if timing is None:
            log(f"-- {label}: warm-up + {args.runs} runs")
            row = time_loop(loop, args, device, label)
        else:
            row = {**timing, "label": label}
        if graphs:
            row["graphs_vs_eager_rel"] = graphs_against_eager(loop, args.steps)
            log(f"   {label}: CUDA graphs against eager, relative difference {row['graphs_vs_eager_rel']}")
        row.update(
            impl=impl, ulysses=u, ring=r, pipefusion=p, tensor=t, distrifusion=d, gpus=u * r * p * t * d,
            compiled=compiled_now, compile_autotune=compiled_now and args.compile_autotune, cuda_graphs=graphs,
            steps=args.steps, text_len=args.text_len,
            tflop_per_loop=flops / 1e12, tflops_per_gpu=flops / row["median_s"] / (u * r * p * t * d) / 1e12,
            env=env, tag=args.tag, **(extra or {}),
        )
        if impl == "ours":
            row.update(attention_backend=args.attention_backend)
        if p > 1:
            row.update(pipefusion_warmup=args.pipefusion_warmup, pipeline_patches=args.pipeline_patches or p,
                       pipefusion_split=split)
        if d > 1:
            row.update(distrifusion_warmup=args.pipefusion_warmup)
        if after is not None:
            row.update(after())
        rows.append(row)
        log(f"   {label}: median {row['median_s']:.3f} s (runs {', '.join(f'{t:.3f}' for t in row['times'])}; "
            f"warm-up {row['warmup_s']:.1f} s), {row['tflops_per_gpu']:.0f} TFLOP/s per GPU, "
            f"peak {max(row['peak_gib_per_rank']):.1f} GiB, finite={row['finite']}")
        if args.json and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        if args.sync_steps:
            from host_syncs import count_host_syncs, report

            barrier(device)
            sync(device)
            counts = count_host_syncs(lambda: loop(args.sync_steps))
            texts = gather_objects(report(counts, args.sync_steps, f"{label} rank {dist.get_rank() if dist.is_initialized() else 0}"))
            if not dist.is_initialized() or dist.get_rank() == 0:
                print("\n".join(texts), flush=True)
        if args.profile_steps:
            text = profile_loop(loop, args, device, label)
            texts = gather_objects(text)
            if not dist.is_initialized() or dist.get_rank() == 0:
                joined = "\n".join(texts)
                profiles.append(joined)
                print(joined, flush=True)
                if args.profile_out:
                    Path(args.profile_out).mkdir(parents=True, exist_ok=True)
                    name = label.replace(" ", "_") + ".txt"
                    (Path(args.profile_out) / name).write_text(joined + "\n")

    if "xdit" in impls:
        for degrees in degrees_list:
            if len(degrees_list) > 1:
                raise SystemExit("xdit: one --degrees row per process (its parallel state is global)")
            model, info = setup_xdit(args, config, device, dtype, degrees)
            if args.compile and args.eager_baseline:
                run_row(DiffusersLoop(model, args, inputs, device, dtype), "xdit", degrees, info)
            if args.compile:
                model = compile_like_xfuser(model)
                compiled_now = True
                info = {**info, "xfuser_compile_mode": XFUSER_FLUX_COMPILE_MODE}
            run_row(DiffusersLoop(model, args, inputs, device, dtype), "xdit", degrees, info)
    elif impls == ["diffusers-cp"]:
        from diffusers import FluxTransformer2DModel

        if len(degrees_list) > 1:
            raise SystemExit("diffusers-cp: one --degrees row per launch (diffusers enables parallelism once per model)")
        degrees = degrees_list[0]
        backend = DIFFUSERS_CP_BACKENDS[device.type]
        t0 = time.perf_counter()
        model = build_model(FluxTransformer2DModel, config, device, dtype, args.seed)
        model.set_attention_backend(backend)
        sync(device)
        log(f"# model built in {time.perf_counter() - t0:.1f} s; attention backend {backend}")
        # The one-GPU result of this very model (same weights, inputs and backend), before parallelism:
        # every CP row's final latents are compared with it (one eager loop per rank, all at once).
        reference = DiffusersLoop(model, args, inputs, device, dtype)(args.steps).float()
        enable_diffusers_context_parallel(model, degrees, device)
        info = {"attention_backend": backend}

        def against_one_gpu(loop):
            def after():
                rel = relative_difference(loop.last, reference)
                log(f"   final latents against the same model on 1 GPU: relative difference {rel:.3e}")
                return {"vs_1gpu_rel": rel}
            return after

        if args.compile and args.eager_baseline:
            loop = DiffusersLoop(model, args, inputs, device, dtype)
            run_row(loop, "diffusers-cp", degrees, info, against_one_gpu(loop))
        if args.compile:
            # Regional compilation as for the 1-GPU diffusers row; graph breaks allowed, as for ours
            # on several GPUs (without any, fullgraph=False compiles the same graphs).
            model.compile_repeated_blocks(fullgraph=False)
            compiled_now = True
        loop = DiffusersLoop(model, args, inputs, device, dtype)
        run_row(loop, "diffusers-cp", degrees, info, against_one_gpu(loop))
    else:
        from diffusers import FluxTransformer2DModel

        t0 = time.perf_counter()
        pipefusion = max(d[2] for d in degrees_list)
        tensor = max(d[3] for d in degrees_list)
        if impls == ["diffusers-tp"]:
            # diffusers' own tensor parallel: the whole model on every GPU, then sharded into DTensors by
            # enable_parallelism with the model's _tp_plan (issue 10's 20.2 s against 5.12 s on 1 GPU).
            if degrees_list != [(1, 1, 1, world_size, 1)]:
                raise SystemExit("diffusers-tp: --degrees t<N> with N the number of launched processes")
            model = build_model(FluxTransformer2DModel, config, device, dtype, args.seed)
            model.enable_parallelism(config=diffusers.TensorParallelConfig(tp_degree=world_size))
        elif tensor > 1:
            # A tensor-parallel rank builds only its slices (about 1/N of the block weights), as the loader does.
            if len(degrees_list) > 1 or impls != ["ours"] or tensor != world_size:
                raise SystemExit("tensor-parallel rows: one --degrees row per launch (t = the world size), --impl ours only")
            model = build_tensor_parallel(config, device, dtype, args.seed)
        elif pipefusion > 1:
            # A PipeFusion rank builds only its stage (about 1/N of the weights), as the loader does.
            if len(degrees_list) > 1 or impls != ["ours"]:
                raise SystemExit("PipeFusion rows: one --degrees row per launch, --impl ours only")
            model = build_stage(config, degrees_list[0], device, dtype, args.seed, args.pipefusion_split)
        else:
            model = build_model(FluxTransformer2DModel, config, device, dtype, args.seed)
        sync(device)
        params = sum(p.numel() for p in model.parameters())
        log(f"# model: {params / 1e9:.2f} B parameters built in {time.perf_counter() - t0:.1f} s")
        if args.compile and args.eager_baseline and "diffusers" in impls:
            run_row(DiffusersLoop(model, args, inputs, device, dtype), "diffusers", (1, 1, 1))
        if args.compile:
            if args.comm_overlap:
                enable_comm_overlap_reordering()
            # Regional compilation, as diffusers recommends; ours with sequence parallelism has
            # collectives inside the attention processor, so graph breaks are allowed there. Ours
            # rows get the engine's compile options (compile_options: waits sunk for the overlaps).
            options = repeated_block_compile_options(args, impls, degrees_list, device)
            model.compile_repeated_blocks(fullgraph=world_size == 1, **options)
            compiled_now = True
        if args.interleave:
            run_interleaved(run_row, model, args, inputs, device, dtype, impls, degrees_list)
            finish(device)
            return 0
        if "diffusers" in impls:
            run_row(DiffusersLoop(model, args, inputs, device, dtype), "diffusers", (1, 1, 1))
        if "diffusers-tp" in impls:
            run_row(DiffusersLoop(model, args, inputs, device, dtype), "diffusers-tp", degrees_list[0])
        if "ours" in impls and args.cache:
            for degrees in degrees_list:
                run_cache_rows(run_row, model, args, inputs, device, dtype, degrees, config)
        elif "ours" in impls:
            for degrees in degrees_list:
                for cond in args.cond.split(","):
                    if cond not in ("cpu", "device"):
                        raise SystemExit(f"--cond takes cpu and/or device, got {cond!r}")
                    run_row(OursLoop(model, args, inputs, device, dtype, degrees, cond), "ours", degrees, {"cond": cond})

    finish(device)
    return 0


def finish(device: torch.device) -> None:
    """End a launch once every rank has written its rows. After CUDA graphs were captured on an
    NCCL group (ours with --cuda-graphs, xfuser's compile in mode reduce-overhead), tearing the
    group down has hung (runs F, H and O in docs/performance.md), which cost the launch's whole
    timeout; the rows are on disk by then, so a launch on GPUs exits at once."""
    if not dist.is_initialized():
        return
    barrier(device)
    if device.type == "cuda":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


def run_interleaved(run_row, model, args, inputs, device, dtype, impls, degrees_list) -> None:
    """--interleave: the launch's diffusers and ours rows (cond cpu) timed in turn, one run each."""
    if args.cache or args.cond != "cpu" or not set(impls) <= {"diffusers", "ours"}:
        raise SystemExit("--interleave: diffusers and ours rows only, without --cache and --cond")
    specs = [(DiffusersLoop(model, args, inputs, device, dtype), "diffusers", (1, 1, 1, 1, 1), None)] \
        if "diffusers" in impls else []
    if "ours" in impls:
        specs += [(OursLoop(model, args, inputs, device, dtype, degrees), "ours", degrees, {"cond": "cpu"})
                  for degrees in degrees_list]
    log(f"-- {len(specs)} rows interleaved: warm-up each, then {args.runs} rounds of one run each")
    timings = time_loops([spec[0] for spec in specs], args, device, [spec[1] for spec in specs])
    for (loop, impl, degrees, extra), timing in zip(specs, timings):
        run_row(loop, impl, degrees, extra, timing=timing)


def run_cache_rows(run_row, model, args, inputs, device, dtype, degrees, config) -> None:
    """One ours row per --cache entry at these degrees: time, computed/skipped steps, and the
    final latents' relative error against the no-cache row (a consistency check: random weights
    say nothing about image quality)."""
    reference = None
    for name in args.cache.split(","):
        loop = OursLoop(model, args, inputs, device, dtype, degrees, cache=cache_settings(name.strip(), args.steps, config))

        def after(name=name, loop=loop):
            nonlocal reference
            if name.startswith("ditfastattn"):  # a plan of attention methods, not skipped calls
                extra = {"cache": name, "fastattn_plan": fastattn_plan_of(loop).counts()}
            else:
                record = loop.engine.last_cache_record
                extra = {"cache": name, "computed_calls": sum(d.computed for d in record),
                         "skipped_calls": sum(not d.computed for d in record)}
            if name == "none":
                reference = loop.last.float()
            elif reference is not None:
                extra["rel_error_vs_none"] = float((loop.last.float() - reference).abs().max() / reference.abs().max())
            return extra

        run_row(loop, "ours", degrees, {"cond": "cpu", "cache": name}, after)


def fastattn_plan_of(loop):
    """The DiTFastAttn plan the loop's last job ran: its fixed plan, else the one calibrated on the
    warm-up loop (kept on the model, one per job shape)."""
    from comfy_xdit.fastattn.job import PLAN_STORE

    fixed = loop.cache.plan
    if fixed is not None:
        return fixed
    plans = list(loop.engine.model.__dict__.get(PLAN_STORE, {}).values())
    return plans[-1]


if __name__ == "__main__":
    sys.exit(main())
