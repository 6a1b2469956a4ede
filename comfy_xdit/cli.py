"""The ``comfy-xdit`` command line: demo, generate, bench.

Flags follow xDiT's spelling (``--ulysses-degree 2 --ring-degree 2 --use-cfg-parallel``) so a
command copied from xDiT's examples means the same here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .config import PIPEFUSION_SPLITS, ConfigError, ParallelConfig, default_devices


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism (the degrees multiply to the number of workers)")
    group.add_argument("--ulysses-degree", type=int, default=None, help="Ulysses sequence-parallel degree")
    group.add_argument("--ring-degree", type=int, default=1, help="Ring sequence-parallel degree")
    group.add_argument("--pipefusion-parallel-degree", type=int, default=1, help="PipeFusion degree: layers split over this many stages")
    group.add_argument("--num-pipeline-patch", dest="num_pipeline_patches", type=int, default=None,
                       help="PipeFusion patches (bands of token rows); default: the pipefusion degree")
    group.add_argument("--warmup-steps", type=int, default=1,
                       help="PipeFusion and DistriFusion: steps run exactly before stale K/V is reused")
    group.add_argument("--pipefusion-split", choices=list(PIPEFUSION_SPLITS), default="auto",
                       help="PipeFusion: split the layers for even weight memory per GPU (parameters), even time per "
                            "stage (compute: equal block counts; the stage with Flux's double blocks holds more weights), "
                            "or both (interleaved: each stage holds 1/N of the double and 1/N of the single blocks, and "
                            "each patch passes the stages twice); auto (default): interleaved where every stage can "
                            "hold a double and a single block, else parameters")
    group.add_argument("--use-cfg-parallel", action="store_true", help="conditional and unconditional branch on two groups")
    group.add_argument("--data-parallel-degree", type=int, default=1, help="split the batch over this many groups")
    group.add_argument("--tensor-parallel-degree", "--tp", dest="tensor_parallel_degree", type=int, default=1,
                       help="tensor parallel: attention heads and MLP columns split over this many workers (each holds "
                            "about 1/N of the block weights); combines with --use-cfg-parallel and --data-parallel-degree")
    group.add_argument("--distrifusion-degree", type=int, default=1,
                       help="DistriFusion: each worker holds the whole model and denoises its patch of the image, with the "
                            "other patches' one-step-stale K/V after --warmup-steps; combines with --use-cfg-parallel and "
                            "--data-parallel-degree")
    group.add_argument("--attention-backend", default="auto", help="auto, sdpa, cudnn, flash, flash_attn, cpu_flash")
    group.add_argument("--devices", default=None, help="comma-separated, e.g. cuda:0,cuda:1 (default: all GPUs, or 2 CPU workers)")
    group.add_argument("--workers", type=int, default=None, help="how many workers when --devices is not given")


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where the workers run (README: several machines)")
    group.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local: worker processes on this machine (and other machines' `comfy-xdit worker` "
                            "agents with --nnodes); ray: Ray actors on a Ray cluster")
    group.add_argument("--ray-address", default="auto", help="auto (this machine's Ray cluster), ray://HOST:10001, or local")
    group.add_argument("--placement", choices=["pack", "spread"], default="pack",
                       help="Ray: every worker on one node (pack) or spread over nodes")
    group.add_argument("--nnodes", type=int, default=1, help="local backend: how many machines, each with --devices' devices")
    group.add_argument("--master-addr", default=None, help="with --nnodes > 1: this machine's address as the others reach it")
    group.add_argument("--master-port", type=int, default=29500, help="with --nnodes > 1: the rendezvous port here")


def backend_from_flags(args: argparse.Namespace):
    from .pool.backends import Backend
    from .pool.multinode import Cluster

    defaults = {"backend": "local", "ray_address": "auto", "placement": "pack", "nnodes": 1, "master_addr": None,
                "master_port": 29500}
    args = argparse.Namespace(**{**defaults, **vars(args)})  # callers that build their own Namespace
    cluster = None
    if args.nnodes > 1:
        if args.backend == "ray":
            raise ConfigError("--nnodes is for the local backend; a Ray pool spans nodes by itself (--placement spread)")
        if not args.master_addr:
            raise ConfigError("--nnodes > 1 needs --master-addr: this machine's address as the other nodes reach it")
        cluster = Cluster(args.master_addr, args.master_port)
    return Backend(args.backend, ray_address=args.ray_address, placement=args.placement, cluster=cluster)


def config_from_flags(args: argparse.Namespace) -> ParallelConfig:
    devices = tuple(args.devices.split(",")) if args.devices else default_devices(args.workers)
    if getattr(args, "nnodes", 1) > 1:
        from .pool.multinode import multi_node_devices

        devices = multi_node_devices(devices, args.nnodes)
    ulysses = args.ulysses_degree
    if ulysses is None:
        # Whatever the other degrees leave over goes to Ulysses, the cheapest exact method.
        others = args.ring_degree * args.pipefusion_parallel_degree * args.data_parallel_degree * (2 if args.use_cfg_parallel else 1)
        others *= getattr(args, "tensor_parallel_degree", 1) * getattr(args, "distrifusion_degree", 1)
        ulysses = max(1, len(devices) // others)
    return ParallelConfig(
        ulysses_degree=ulysses,
        ring_degree=args.ring_degree,
        pipefusion_parallel_degree=args.pipefusion_parallel_degree,
        use_cfg_parallel=args.use_cfg_parallel,
        data_parallel_degree=args.data_parallel_degree,
        tensor_parallel_degree=getattr(args, "tensor_parallel_degree", 1),
        distrifusion_degree=getattr(args, "distrifusion_degree", 1),
        num_pipeline_patches=args.num_pipeline_patches,
        warmup_steps=args.warmup_steps,
        pipefusion_split=getattr(args, "pipefusion_split", "auto"),
        attention_backend=args.attention_backend,
        devices=devices,
    )


def _demo(args: argparse.Namespace) -> int:
    config = config_from_flags(args)
    if not args.engine_only:
        from .comfyui_demo import run_comfyui_demo
        from .comfyui_server import find_comfyui

        try:
            find_comfyui(args.comfyui)
        except FileNotFoundError as missing:
            print(f"comfy-xdit demo: {missing}\nrunning the engine-only demo instead", file=sys.stderr)
        else:
            return run_comfyui_demo(args, config)
    from .demo import run_demo

    return run_demo(args, config)


def _generate(args: argparse.Namespace) -> int:
    from .generate import run_generate

    return run_generate(args, config_from_flags(args))


def _worker(args: argparse.Namespace) -> int:
    from .pool.multinode import run_agent

    return run_agent(args.master_addr, args.master_port, args.node_rank, args.nnodes, args.nproc_per_node)


def _bench(args: argparse.Namespace) -> int:
    runner = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not runner.exists():
        print(f"comfy-xdit bench needs a source checkout (bench/run.py not found next to {runner.parent.parent})", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(runner), "--group", args.group, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfy-xdit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="a small random Flux on 1 and on N workers: timings and max difference")
    demo.add_argument("--out", type=Path, default=Path("comfy_xdit_demo"), help="where the checkpoint, latents and preview go")
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size / 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--comfyui", default=None, help="a ComfyUI folder to run (default: $COMFYUI_PATH, else the pinned one tools/setup.sh installs)")
    demo.add_argument("--engine-only", action="store_true", help="skip ComfyUI: drive the worker pool directly")
    add_parallel_flags(demo)
    demo.set_defaults(run=_demo)

    generate = commands.add_parser("generate", help="sample a Flux checkpoint in parallel; writes a ComfyUI .latent")
    generate.add_argument("--model", required=True, help="Flux .safetensors file (BFL or diffusers layout) or diffusers folder")
    generate.add_argument("--conditioning", default=None, help="safetensors with context, pooled (and negative_context, negative_pooled)")
    generate.add_argument("--random-conditioning", action="store_true", help="use seeded random conditioning (for trying the engine)")
    generate.add_argument("--height", type=int, default=1024)
    generate.add_argument("--width", type=int, default=1024)
    generate.add_argument("--batch-size", type=int, default=1)
    generate.add_argument("--steps", type=int, default=20)
    generate.add_argument("--cfg", type=float, default=1.0)
    generate.add_argument("--guidance", type=float, default=3.5)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--sampler", default="euler")
    generate.add_argument("--scheduler", default="simple")
    generate.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    generate.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (first job of a shape compiles)")
    generate.add_argument("--cuda-graphs", action="store_true", help="GPU workers: replay each step as a captured CUDA graph")
    generate.add_argument("--cache", default="none", choices=["none", "fbcache", "teacache", "ditfastattn"],
                          help="step cache: First-Block-Cache or TeaCache (skips most of the model on steps that barely "
                          "change), or DiTFastAttn (compresses attention per layer and step)")
    generate.add_argument("--cache-threshold", type=float, default=0.0,
                          help="0: the default (fbcache 0.08; teacache 0.4 on Flux, 0.05 / 0.10 on Wan 1.3B / 14B; ditfastattn 0.1); higher skips more")
    generate.add_argument("--fastattn-window", type=int, default=64,
                          help="ditfastattn: tokens on each side that window attention sees (xDiT's default 64)")
    generate.add_argument("--output", type=Path, default=Path("output.latent"))
    add_parallel_flags(generate)
    add_backend_flags(generate)
    generate.set_defaults(run=_generate)

    worker = commands.add_parser(
        "worker", help="serve another machine's pool: run on every extra machine of a multi-node pool (no Ray)")
    worker.add_argument("--master-addr", required=True, help="the pool host's address (its --master-addr)")
    worker.add_argument("--master-port", type=int, default=29500, help="the pool host's --master-port")
    worker.add_argument("--node-rank", type=int, required=True, help="this machine's number, 1..nnodes-1 (the pool host is 0)")
    worker.add_argument("--nnodes", type=int, required=True, help="how many machines in all, the pool host included")
    worker.add_argument("--nproc-per-node", type=int, required=True, help="workers on this machine (as many as on the host)")
    worker.set_defaults(run=_worker)

    bench = commands.add_parser("bench", help="GPU benchmarks (source checkout): comfy-xdit bench --group NAME")
    bench.add_argument("--group", required=True)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pool import PoolError

    try:
        return args.run(args)
    except (ConfigError, ValueError, OSError, PoolError) as error:
        # Bad input and worker failures get one clear line, not a traceback.
        print(f"comfy-xdit: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("comfy-xdit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
