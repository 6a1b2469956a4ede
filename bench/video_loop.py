"""Time CogVideoX-5B denoising steps with CFG: plain diffusers and ours (RankEngine), in seconds per step.

Real-size CogVideoXTransformer3DModel with CogVideoX-5b's published config (42 blocks, 48 heads x 64,
T5 text 4096 wide, 3-D rotary positions), random weights drawn on the device from a fixed seed (speed
does not depend on weight values), bf16; 49 frames of 480x720 (a 13 x 60 x 90 latent: 17550 video
tokens after the 2x2 patches), 226 text tokens, cfg 6.0 with a negative of the same length (two
forwards per step), CogVideoX-5b's CogVideoXDPMScheduler. Only denoising steps are timed: no text
encoder, no VAE.

A video step takes seconds, so each row is one sampling call of --warmup + --steps steps (repeated
--runs times): the warm-up steps are not timed, each later step is timed on its own (device
synchronised at its end) and the row reports the median over the timed steps of the slowest rank's
step time.

One GPU:   python bench/video_loop.py --impl diffusers,ours
Two GPUs:  torchrun --nproc-per-node 2 bench/video_loop.py --impl ours --degrees c2,u2   (cfg parallel, ulysses=2)
Four GPUs: torchrun --nproc-per-node 4 bench/video_loop.py --impl ours --degrees c2u2,u4
CPU dry run: python bench/video_loop.py --device cpu --tiny --steps 2
             torchrun --nproc-per-node 2 bench/video_loop.py --device cpu --tiny --impl ours --degrees c2,u2 --steps 2

Degrees as sd3_loop.py's: u<N> ulysses, r<N> ring, c2 cfg parallel, combined as e.g. c2u2. The
diffusers row is CogVideoXPipeline.__call__ itself (prompt embeddings given, output_type "latent").
Ours is RankEngine.sample with a CogVideoX request on the diffusers-semantics path (the same
scheduler config, read from a scheduler/ folder written to a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import flux_loop as common  # noqa: E402  (model building, timing, logging and device helpers)
from sd3_loop import parse_degrees  # noqa: E402  (u/r/c degrees)

# CogVideoX-5b's transformer/config.json (diffusers' defaults fill the rest: in/out channels 16,
# time embedding 512, gelu-approximate, patch 2, max text 226).
FULL_CONFIG = dict(
    num_attention_heads=48, attention_head_dim=64, num_layers=42, text_embed_dim=4096, time_embed_dim=512,
    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
)
# Rotary splits the head width 1/4 frames, 3/8 height, 3/8 width: 16 is the smallest that works;
# 4 heads take ulysses=4.
TINY_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=16, num_layers=2, text_embed_dim=32, time_embed_dim=16,
    sample_width=8, sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=8,
    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
)
# CogVideoX-5b's scheduler/scheduler_config.json.
SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0, "timestep_spacing": "trailing",
}
CFG = 6.0
SCALE_5B = 0.7  # the CogVideoX-5b VAE's scaling_factor: ours returns latents divided by it, the pipeline does not
LATENT_CHANNELS = 16
VAE_SPATIAL, VAE_TEMPORAL = 8, 4  # the CogVideoX VAE's compression


def latent_shape(args) -> tuple[int, int, int]:
    """(frames, height, width) of the latent for --frames pixel frames of --height x --width."""
    return (args.frames - 1) // VAE_TEMPORAL + 1, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL


def make_inputs(args, config: dict) -> dict:
    """Random T5 embeddings for the prompt and the negative, the same on every rank (CPU generator)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    shape = (1, args.text_len, config["text_embed_dim"])
    return {"context": torch.randn(shape, generator=gen), "negative_context": torch.randn(shape, generator=gen)}


def flops_per_step(config: dict, video_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one step (two forwards: cfg; multiply-add = 2): every block's qkv + out (4d^2) and
    feed-forward (8d^2) over the joint [text, video] sequence and its attention, the patch and text
    embedders and the output projection; AdaLN, norms, rotary and elementwise work not counted."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s = video_tokens + text_tokens
    block = 2 * 12 * d * d * s + 4 * s * s * d
    patch = LATENT_CHANNELS * config["patch_size"] ** 2
    embed = 2 * video_tokens * patch * d + 2 * text_tokens * config["text_embed_dim"] * d
    forward = config["num_layers"] * block + embed + 2 * video_tokens * d * patch
    return 2 * forward


class StepClock:
    """StepHooks that stamp the end of every step (device synchronised); also the pipeline's step callback."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[float] = []

    def start(self) -> None:
        common.sync(self.device)
        self.marks = [time.perf_counter()]

    def on_step(self, step: int, total: int, preview) -> None:
        common.sync(self.device)
        self.marks.append(time.perf_counter())

    def cancel_requested(self) -> bool:
        return False

    def pipeline_callback(self, pipe, i, t, callback_kwargs) -> dict:
        self.on_step(i + 1, None, None)
        return {}

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class DiffusersLoop:
    """CogVideoXPipeline.__call__ with prompt embeddings given and output_type "latent": the
    pipeline's own latents, scheduler, rotary tables and batch of [negative, prompt]."""

    def __init__(self, model, args, inputs, device, dtype):
        from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline

        self.pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                      scheduler=CogVideoXDPMScheduler.from_config(SCHEDULER_CONFIG))
        self.pipe.set_progress_bar_config(disable=True)
        # encode_prompt's output lives on the device in the transformer's dtype.
        self.prompt_embeds = inputs["context"].to(device, dtype)
        self.negative_embeds = inputs["negative_context"].to(device, dtype)
        self.args, self.device = args, device

    def __call__(self, steps: int, clock: StepClock | None = None) -> torch.Tensor:
        a = self.args
        return self.pipe(prompt_embeds=self.prompt_embeds, negative_prompt_embeds=self.negative_embeds,
                         num_frames=a.frames, height=a.height, width=a.width, num_inference_steps=steps,
                         # a CPU generator, as ours draws its noise: the same latents, so the rows can be compared
                         guidance_scale=CFG, generator=torch.Generator().manual_seed(a.seed),
                         output_type="latent", return_dict=False,
                         callback_on_step_end=clock.pipeline_callback if clock else None)[0]


class OursLoop:
    """RankEngine.sample with a CogVideoX request (the folder's CogVideoXDPMScheduler in the pipeline's
    loop, cfg 6.0); the conditioning stays on the CPU, as the worker pool hands it over."""

    def __init__(self, model, args, inputs, device, dtype, degrees, folder: Path):
        from comfy_xdit.config import ParallelConfig
        from comfy_xdit.engine import RankEngine
        from comfy_xdit.mesh import ParallelMesh
        from comfy_xdit.requests import CogVideoXConditioning, ModelSpec

        u, r, c = degrees
        n = u * r * c
        devices = tuple(f"cuda:{i}" for i in range(n)) if device.type == "cuda" else ("cpu",) * n
        config = ParallelConfig(ulysses_degree=u, ring_degree=r, use_cfg_parallel=c == 2, devices=devices)
        self.engine = RankEngine(ParallelMesh.build(config, device))
        dtype_name = {v: k for k, v in common.DTYPES.items()}[dtype]
        # The path is the folder holding scheduler/scheduler_config.json: the family reads its scheduler there.
        self.engine.set_model(model, ModelSpec(path=str(folder), family="cogvideox", dtype=dtype_name))
        self.positive = CogVideoXConditioning(inputs["context"])
        self.negative = CogVideoXConditioning(inputs["negative_context"])
        self.args = args

    def __call__(self, steps: int, clock: StepClock | None = None) -> torch.Tensor:
        from comfy_xdit.requests import SampleRequest

        a = self.args
        latent = torch.zeros(1, LATENT_CHANNELS, *latent_shape(a))  # ComfyUI's video LATENT [B, C, T, H, W]
        request = SampleRequest(latent=latent, positive=self.positive, negative=self.negative, seed=a.seed,
                                steps=steps, cfg=CFG)
        return self.engine.sample(request, clock)


def write_scheduler_folder(root: Path) -> Path:
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return root


def time_steps(loop, args, device, label: str) -> dict:
    """--runs sampling calls of --warmup + --steps steps; per-step times of the timed steps, slowest rank."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(device)
    total = args.warmup + args.steps
    times, warmup_s, out = [], [], None
    for _ in range(args.runs):
        common.barrier(device)
        clock.start()
        out = loop(total, clock)
        common.sync(device)
        steps = clock.step_times()
        if len(steps) != total:
            raise RuntimeError(f"{label}: {len(steps)} step marks for {total} steps")
        warmup_s.append(sum(steps[:args.warmup]))
        times += steps[args.warmup:]
    finite = bool(torch.isfinite(out.float()).all())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0
    per_rank = common.gather_objects({"times": times, "peak_gib": peak, "reserved_gib": reserved, "finite": finite})
    slowest = [max(r["times"][i] for r in per_rank) for i in range(len(times))]
    return {
        "label": label,
        "times": slowest,  # seconds per timed step, slowest rank
        "median_s": statistics.median(slowest),
        "min_s": min(slowest),
        "warmup_s": max(warmup_s),
        "peak_gib_per_rank": [round(r["peak_gib"], 2) for r in per_rank],
        "reserved_gib_per_rank": [round(r["reserved_gib"], 2) for r in per_rank],
        "finite": all(r["finite"] for r in per_rank),
        "out": out,  # this rank's last latents (taken out of the row before it is written)
    }


def compile_blocks(model) -> None:
    """Regional compile by hand (CogVideoXTransformer3DModel declares no _repeated_blocks): each block on its own."""
    for block in model.transformer_blocks:
        block.compile(fullgraph=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="diffusers,ours", help="comma list of diffusers, ours")
    p.add_argument("--degrees", default=None, help="comma list of rows for ours, e.g. c2,u2 (default: ulysses over the world)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--runs", type=int, default=1, help="sampling calls per row (their timed steps pooled)")
    p.add_argument("--frames", type=int, default=49, help="pixel frames (latent frames: (frames - 1) / 4 + 1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--text-len", type=int, default=226)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=sorted(common.DTYPES), help="default bfloat16 (float32 with --device cpu)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny CogVideoX (2 blocks, 4 heads x 16, 9 frames of 64x64) for dry runs")
    p.add_argument("--compile", action="store_true", help="diffusers rows: torch.compile each transformer block "
                   "(ours refuses compile for CogVideoX)")
    p.add_argument("--profile-steps", type=int, default=0, help="after timing, profile a call of this many steps")
    p.add_argument("--profile-out", default=None, help="directory for per-rank profile summaries")
    p.add_argument("--json", default=None, help="append one JSON line per row here (rank 0)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    if not impls or any(i not in ("diffusers", "ours") for i in impls):
        raise SystemExit(f"--impl takes diffusers and/or ours, got {args.impl!r}")
    if args.compile and "ours" in impls:
        raise SystemExit("--compile: diffusers rows only (ours refuses compile for CogVideoX): use --impl diffusers")
    if args.steps < 1 or args.warmup < 0 or args.runs < 1:
        raise SystemExit("--steps and --runs take 1 or more, --warmup 0 or more")
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
    if args.tiny and (args.frames, args.height, args.width) == (49, 480, 720):
        args.frames, args.height, args.width = 9, 64, 64
        args.text_len = 8 if args.text_len == 226 else args.text_len
    step_px = VAE_SPATIAL * config["patch_size"]
    if args.height % step_px or args.width % step_px or (args.frames - 1) % VAE_TEMPORAL:
        raise SystemExit(f"--height and --width take multiples of {step_px}, --frames 4k + 1 (e.g. 49)")
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
    from diffusers import CogVideoXTransformer3DModel

    frames, lh, lw = latent_shape(args)
    video_tokens = frames * (lh // config["patch_size"]) * (lw // config["patch_size"])
    flops = flops_per_step(config, video_tokens, args.text_len)
    model_name = "cogvideox-tiny" if args.tiny else "cogvideox-5b"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "world_size": world_size}
    try:
        from importlib.metadata import version

        env["yunchang"] = version("yunchang")
    except Exception:
        pass
    common.log(f"# video loop {model_name}: {json.dumps(env)} latent {frames}x{lh}x{lw} = {video_tokens} video tokens, "
               f"text={args.text_len}, cfg={CFG}, {args.warmup} warm-up + {args.steps} timed steps x {args.runs} runs, "
               f"{flops / 1e12:.1f} TFLOP per step")
    inputs = make_inputs(args, config)
    t0 = time.perf_counter()
    model = common.build_model(CogVideoXTransformer3DModel, config, device, dtype, args.seed)
    common.sync(device)
    common.log(f"# model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters built in {time.perf_counter() - t0:.1f} s")
    if args.compile:
        compile_blocks(model)

    last = {}  # impl -> the latents of its last call, ComfyUI's layout and scale

    def run_row(loop, impl, degrees):
        u, r, c = degrees
        label = f"{model_name} {impl} u{u}r{r}{' cfg2' if c == 2 else ''}{' compiled' if args.compile else ''}"
        common.log(f"-- {label}: {args.runs} x ({args.warmup} warm-up + {args.steps} timed steps)")
        row = time_steps(loop, args, device, label)
        last[impl] = row.pop("out")
        if impl == "diffusers":  # the pipeline's [B, T, C, H, W] latents -> ComfyUI's raw LATENT
            last[impl] = last[impl].permute(0, 2, 1, 3, 4).float() / SCALE_5B
        if impl == "ours" and "diffusers" in last:
            # Both sampled the same noise with the same scheduler: a check that the rows time the same computation.
            reference = last["diffusers"].to(last[impl].device)
            row["rel_diff_vs_diffusers"] = float((last[impl].float() - reference).abs().max() / reference.abs().max())
            common.log(f"   {label}: latents differ from diffusers' by {row['rel_diff_vs_diffusers']:.2e} (relative max)")
        gpus = u * r * c
        row.update(impl=impl, model=model_name, ulysses=u, ring=r, cfg_parallel=c == 2, gpus=gpus, compiled=args.compile,
                   cuda_graphs=False, per_step=True, steps=args.steps, warmup_steps=args.warmup, runs=args.runs,
                   frames=args.frames, height=args.height, width=args.width, video_tokens=video_tokens,
                   tflop_per_step=flops / 1e12, tflops_per_gpu=flops / row["median_s"] / gpus / 1e12, env=env, tag=args.tag)
        common.log(f"   {label}: median {row['median_s']:.3f} s/step (steps {', '.join(f'{t:.3f}' for t in row['times'])}; "
                   f"warm-up {row['warmup_s']:.1f} s), {row['tflops_per_gpu']:.0f} TFLOP/s per GPU, "
                   f"peak {max(row['peak_gib_per_rank']):.1f} GiB, finite={row['finite']}")
        if args.json and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        if args.profile_steps:
            texts = common.gather_objects(common.profile_loop(loop, args, device, label))
            if not dist.is_initialized() or dist.get_rank() == 0:
                joined = "\n".join(texts)
                print(joined, flush=True)
                if args.profile_out:
                    Path(args.profile_out).mkdir(parents=True, exist_ok=True)
                    (Path(args.profile_out) / (label.replace(" ", "_") + ".txt")).write_text(joined + "\n")

    if "diffusers" in impls:
        run_row(DiffusersLoop(model, args, inputs, device, dtype), "diffusers", (1, 1, 1))
    if "ours" in impls:
        with tempfile.TemporaryDirectory(prefix="video_loop_") as tmp:
            folder = write_scheduler_folder(Path(tmp))
            # Sequence-parallel rows install their attention processors and hooks on the model, so they come last.
            for degrees in sorted(degrees_list, key=lambda d: d[0] * d[1]):
                run_row(OursLoop(model, args, inputs, device, dtype, degrees, folder), "ours", degrees)
    common.finish(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
