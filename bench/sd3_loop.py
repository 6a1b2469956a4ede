"""Time the 28-step SD3-medium denoising loop with CFG: plain diffusers and ours (RankEngine).

Real-size SD3Transformer2DModel with SD3-medium's published config (24 joint blocks, 24 heads x 64,
caption projection 1536, pos-embed grid 192), random weights drawn on the device from a fixed seed
(speed does not depend on weight values), bf16, 1024x1024 (4096 image tokens), 333 text tokens
(77 CLIP + 256 T5, what the SD3 pipeline and ComfyUI's encoders give), cfg 4.5 with a negative of the
same length. Only the denoising loop is timed: no text encoders, no VAE.

One GPU:   python bench/sd3_loop.py --impl diffusers,ours
Two GPUs:  torchrun --nproc-per-node 2 bench/sd3_loop.py --impl ours --degrees c2     (cfg parallel)
           torchrun --nproc-per-node 2 bench/sd3_loop.py --impl ours --degrees u2     (ulysses=2)
CPU dry run: python bench/sd3_loop.py --device cpu --tiny --steps 2 --runs 1
             torchrun --nproc-per-node 2 bench/sd3_loop.py --device cpu --tiny --impl ours --degrees c2,u2 --steps 2 --runs 1

Degrees: u<N> ulysses, r<N> ring, c2 cfg parallel, combined as e.g. c2u2. Timing, rows and JSON
are flux_loop.py's (one warm-up, then --runs loops, median of the slowest rank).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import flux_loop as common  # noqa: E402  (timing, logging and device helpers shared with the Flux bench)

FULL_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
TINY_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
)
CFG = 4.5


def parse_degrees(text: str) -> tuple[int, int, int]:
    """'u2' -> (ulysses 2, ring 1, cfg 1); 'c2' -> (1, 1, 2); 'c2u2' -> (2, 1, 2)."""
    parts = dict(u=1, r=1, c=1)
    found = re.findall(r"([urc])(\d+)", text.strip().lower())
    if "".join(f"{k}{v}" for k, v in found) != text.strip().lower() or any(k == "c" and v != "2" for k, v in found):
        raise SystemExit(f"cannot read degrees {text!r}; write e.g. u2, r2, c2, c2u2")
    parts.update({k: int(v) for k, v in found})
    return parts["u"], parts["r"], parts["c"]


def build_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights as flux_loop's, plus the positional table (a buffer) drawn the same way."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for _, b in model.named_buffers():
            b.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def make_inputs(args, config: dict) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1)
    shape = (1, args.text_len, config["joint_attention_dim"])
    return {"context": torch.randn(shape, generator=gen), "pooled": torch.randn(1, config["pooled_projection_dim"], generator=gen),
            "negative_context": torch.randn(shape, generator=gen), "negative_pooled": torch.randn(1, config["pooled_projection_dim"], generator=gen)}


def flops_per_forward(config: dict, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward (multiply-add = 2): joint blocks' linears and attention, embedders, output."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s = image_tokens + text_tokens
    block = 2 * (12 * d * d) * s + 4 * s * s * d  # two streams: qkv + out (4d^2) and mlp (8d^2) per token
    patch = config["in_channels"] * config["patch_size"] ** 2
    embed = 2 * image_tokens * patch * d + 2 * text_tokens * config["joint_attention_dim"] * d
    return config["num_layers"] * block + embed + 2 * image_tokens * d * patch


class DiffusersLoop:
    """StableDiffusion3Pipeline.__call__ between encode_prompt and the VAE: CFG as one batch of 2,
    FlowMatchEulerDiscreteScheduler with SD3's shift 3.0."""

    def __init__(self, model, args, inputs, device, dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model, self.args, self.device, self.dtype = model, args, device, dtype
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        self.prompt_embeds = torch.cat([inputs["negative_context"], inputs["context"]]).to(device, dtype)
        self.pooled = torch.cat([inputs["negative_pooled"], inputs["pooled"]]).to(device, dtype)

    @torch.no_grad()
    def __call__(self, steps: int) -> torch.Tensor:
        args, device, dtype = self.args, self.device, self.dtype
        gen = torch.Generator(device=device).manual_seed(args.seed)
        latents = torch.randn(1, 16, args.height // 8, args.width // 8, generator=gen, device=device, dtype=dtype)
        self.scheduler.set_timesteps(steps, device=device)
        self.scheduler.set_begin_index(0)
        for t in self.scheduler.timesteps:
            latent_input = torch.cat([latents] * 2)
            noise_pred = self.model(hidden_states=latent_input, timestep=t.expand(2), encoder_hidden_states=self.prompt_embeds,
                                    pooled_projections=self.pooled, return_dict=False)[0]
            uncond, cond = noise_pred.chunk(2)
            latents = self.scheduler.step(uncond + CFG * (cond - uncond), t, latents, return_dict=False)[0]
        return latents


class OursLoop:
    """RankEngine.sample with a KSampler request (euler, simple, cfg 4.5); conditioning on the CPU as the pool hands it over."""

    def __init__(self, model, args, inputs, device, dtype, degrees):
        from comfy_xdit.config import ParallelConfig
        from comfy_xdit.engine import RankEngine
        from comfy_xdit.mesh import ParallelMesh
        from comfy_xdit.requests import ModelSpec, SD3Conditioning

        u, r, c = degrees
        n = u * r * c
        devices = tuple(f"cuda:{i}" for i in range(n)) if device.type == "cuda" else ("cpu",) * n
        config = ParallelConfig(ulysses_degree=u, ring_degree=r, use_cfg_parallel=c == 2, devices=devices)
        self.engine = RankEngine(ParallelMesh.build(config, device))
        dtype_name = {v: k for k, v in common.DTYPES.items()}[dtype]
        self.engine.set_model(model, ModelSpec(path="<random weights>", family="sd3", dtype=dtype_name,
                                               cuda_graphs=args.cuda_graphs))
        self.positive = SD3Conditioning(inputs["context"], inputs["pooled"])
        self.negative = SD3Conditioning(inputs["negative_context"], inputs["negative_pooled"])
        self.args = args

    def __call__(self, steps: int) -> torch.Tensor:
        from comfy_xdit.requests import SampleRequest

        a = self.args
        latent = torch.zeros(1, 16, a.height // 8, a.width // 8)
        return self.engine.sample(SampleRequest(latent=latent, positive=self.positive, negative=self.negative,
                                                seed=a.seed, steps=steps, cfg=CFG))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="diffusers,ours", help="comma list of diffusers, ours")
    p.add_argument("--degrees", default=None, help="comma list of rows for ours, e.g. c2,u2 (default: ulysses over the world)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=333)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=sorted(common.DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny SD3 (2 blocks, width 32) for dry runs")
    p.add_argument("--cuda-graphs", action="store_true", help="ours: replay each forward as a captured CUDA graph")
    p.add_argument("--profile-steps", type=int, default=0, help="after timing, profile a loop of this many steps")
    p.add_argument("--profile-out", default=None)
    p.add_argument("--json", default=None, help="append one JSON line per row here (rank 0)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    if any(i not in ("diffusers", "ours") for i in impls):
        raise SystemExit(f"--impl takes diffusers and/or ours, got {args.impl!r}")
    rank, world_size, local_rank = common.world()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --device cpu --tiny for a dry run")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = common.DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    config = TINY_CONFIG if args.tiny else FULL_CONFIG
    if args.tiny and args.height == 1024:
        args.height = args.width = 64
        args.text_len = 8 if args.text_len == 333 else args.text_len
    degrees_list = [parse_degrees(d) for d in (args.degrees.split(",") if args.degrees else [f"u{world_size}"])]
    for u, r, c in degrees_list:
        if u * r * c != world_size:
            raise SystemExit(f"degrees u{u}r{r}c{c} need {u * r * c} processes; this run has {world_size}")
    if "diffusers" in impls and world_size != 1:
        raise SystemExit("the diffusers baseline runs on one GPU: launch it without torchrun")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)

    import diffusers

    image_tokens = (args.height // 16) * (args.width // 16)
    # Two forwards per step (conditional and unconditional).
    flops = 2 * flops_per_forward(config, image_tokens, args.text_len) * args.steps
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "world_size": world_size}
    try:
        from importlib.metadata import version

        env["yunchang"] = version("yunchang")
    except Exception:
        pass
    common.log(f"# sd3 loop: {json.dumps(env)} image_tokens={image_tokens} text={args.text_len} steps={args.steps} cfg={CFG} "
               f"{flops / 1e12:.1f} TFLOP per loop")
    inputs = make_inputs(args, config)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype, args.seed)
    common.sync(device)
    common.log(f"# model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters built in {time.perf_counter() - t0:.1f} s")

    def run_row(loop, impl, degrees):
        u, r, c = degrees
        graphs = impl == "ours" and args.cuda_graphs
        label = f"sd3 {impl} u{u}r{r}{' cfg2' if c == 2 else ''}{' cuda-graphs' if graphs else ''}"
        common.log(f"-- {label}: warm-up + {args.runs} runs")
        row = common.time_loop(loop, args, device, label)
        if graphs:
            row["graphs_vs_eager_rel"] = common.graphs_against_eager(loop, args.steps)
            common.log(f"   {label}: CUDA graphs against eager, relative difference {row['graphs_vs_eager_rel']}")
        gpus = u * r * c
        row.update(impl=impl, model="sd3-medium", ulysses=u, ring=r, cfg_parallel=c == 2, gpus=gpus, compiled=False, cuda_graphs=graphs,
                   steps=args.steps, tflop_per_loop=flops / 1e12, tflops_per_gpu=flops / row["median_s"] / gpus / 1e12,
                   env=env, tag=args.tag)
        common.log(f"   {label}: median {row['median_s']:.3f} s (runs {', '.join(f'{t:.3f}' for t in row['times'])}; "
                   f"warm-up {row['warmup_s']:.1f} s), {row['tflops_per_gpu']:.0f} TFLOP/s per GPU, "
                   f"peak {max(row['peak_gib_per_rank']):.1f} GiB, finite={row['finite']}")
        if args.json and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        if args.profile_steps:
            texts = common.gather_objects(common.profile_loop(loop, args, device, label))
            if not dist.is_initialized() or dist.get_rank() == 0:
                print("\n".join(texts), flush=True)

    if "diffusers" in impls:
        run_row(DiffusersLoop(model, args, inputs, device, dtype), "diffusers", (1, 1, 1))
    if "ours" in impls:
        # Sequence-parallel rows install their attention processors and hooks on the model, so they come last.
        for degrees in sorted(degrees_list, key=lambda d: d[0] * d[1]):
            run_row(OursLoop(model, args, inputs, device, dtype, degrees), "ours", degrees)
    common.finish(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
