"""Run one benchmark group in one invocation and print its table.

    python bench/run.py --group flux-usp [--out DIR] [--runs 5] [--profile-steps 3]
    python bench/run.py --group flux-usp --smoke          # 2 steps, 1 run: does every row start?

Groups (each launch is its own process, or torchrun pair, so xDiT's global state stays apart;
--group takes a comma list):
  flux-usp          Flux-dev 1024x1024, 28 steps, eager: diffusers 1 GPU, ours 1 GPU, ours and
                    xDiT at ulysses=2 and ring=2.
  flux-usp-compile  the same with torch.compile of the repeated blocks for diffusers and ours
                    (1 GPU, with a diffusers eager baseline in the same process; ours at
                    ulysses=2 and ring=2); median of 3.
  flux-usp-ring     ours and xDiT at ring=2, eager, again (a second sample of the noisy rows).
  flux-4gpu         4 GPUs: diffusers 1 GPU eager and compiled; ours at ulysses=4, ring=4,
                    ulysses=2 x ring=2 (eager and compiled) and pipefusion=2 x ulysses=2; xDiT at
                    the three USP degrees, eager; median of 3.
  flux-graphs       4 GPUs: ours with each forward replayed as a CUDA graph (eager and compiled) at
                    ulysses=4, ring=4, ulysses=2 x ring=2, beside the 1-GPU baselines.
  flux-4gpu-target  issue 11's target row: ours at ulysses=4 compiled + CUDA graphs, with 512 text
                    tokens (split across the ranks) and 511 (kept whole), beside diffusers 1 GPU
                    (eager and compiled) and xDiT at ulysses=4; median of 3.
  flux-cache        ours with First-Block-Cache and TeaCache at their published default thresholds
                    and with skip patterns forced to the published speedups' density, on 1 GPU and
                    at ulysses=2; each beside ours without cache; relative error of the final
                    latents against no cache (consistency only: random weights); median of 3.
  flux-pipefusion   ours at pipefusion=2 (layers split over 2 GPUs, 2 patches, 1 warmup step)
                    beside ours at ulysses=2 and the 1-GPU baselines; eager.
  flux-pipefusion-graphs  ours at pipefusion=2 (parameter split) with each stage pass (one patch)
                    replayed as a CUDA graph, 2 and 4 patches, and 2 with the compute split (even block count per
                    stage), beside pipefusion=2 eager, ours 1 GPU with CUDA graphs and
                    the 1-GPU eager baselines; median of 3. CPU dry run (graphs are a no-op there):
                    --smoke --extra "--device cpu --tiny".
  flux-pipefusion-interleaved  ours at pipefusion=2 with CUDA graphs and the interleaved split (each
                    GPU holds half the double and half the single blocks: even memory and even
                    compute; each patch passes the GPUs twice), 2 and 4 patches, beside the
                    compute split and the 1-GPU eager baselines; median of 3. CPU dry run:
                    --smoke --extra "--device cpu --tiny".
  flux-distrifusion ours at distrifusion=2 (whole model on each GPU, half the image each, the other
                    half's K/V one step stale after 1 warmup step) beside ours at ulysses=2, ring=2,
                    pipefusion=2 and the 1-GPU baselines; eager. CPU dry run: --smoke --extra
                    "--device cpu --tiny".
  flux-tp           ours at tensor parallel 2 (heads and MLP columns split, one all-reduce per attention
                    and MLP output) beside ours at ulysses=2 and pipefusion=2, diffusers' own tensor
                    parallel at 2 (DTensor, 2 runs) and the 1-GPU baselines; eager. CPU dry run (all but
                    diffusers-t2, which needs GPUs): --smoke --extra "--device cpu --tiny"
                    --only 1gpu,ours-t2,ours-u2,ours-p2.
  flux-text-split   ours at ulysses=2 and ring=2 with 512 text tokens (split across the ranks) and
                    with 511 (indivisible: every rank keeps the whole text, as before the split),
                    eager, and ulysses=2 compiled + CUDA graphs both ways; the 1-GPU baselines.
  flux-2gpu-peers   issue 5's side by side on 2 GPUs, median of 3 per row: diffusers 1 GPU eager and
                    compiled and ours 1 GPU compiled; diffusers' own context parallelism (cuDNN
                    attention) at ulysses=2 eager and compiled, with its final latents against the same
                    model on 1 GPU; xDiT at ulysses=2 eager and compiled (xfuser's own compile: the
                    whole transformer, mode reduce-overhead); ours at ulysses=2 with CUDA graphs, eager
                    and compiled. About 9 minutes on an H100 pair. CPU dry run (xDiT needs GPUs):
                    --smoke --extra "--device cpu --tiny" --only 1gpu,diffusers-cp-u2,ours-u2-graphs.
  flux-comm-overlap ours at ulysses=2 with CUDA graphs, compiled and eager, plain (both overlaps
                    off) and with the Ulysses all-to-alls beside other work: each single block's
                    all-to-all beside its MLP (--ulysses-overlap-mlp), the heads in 2 chunks
                    pipelined with attention (--ulysses-head-chunks 2), and both (ours' default);
                    beside diffusers compiled and ours compiled + graphs on 1 GPU; about 6 minutes
                    on 2 H200s (7 launches took 334 s in run P).
  flux-head-chunks  ours at ulysses=2, compiled + CUDA graphs, with the MLP overlap and the heads in
                    1, 2 (the default), 3, 4 and 6 chunks, beside diffusers compiled and ours
                    compiled + graphs on 1 GPU (interleaved); about 5 minutes on 2 GPUs. CPU dry
                    run (the tiny model has 2 heads a rank): --smoke --extra "--device cpu --tiny"
                    --only ours-u2-compiled-graphs-chunks1,ours-u2-compiled-graphs-chunks2.
  flux-autotune     inductor's GEMM autotuning (--compile-autotune: Triton templates against cuBLAS,
                    as mode max-autotune-no-cudagraphs) with and without: ours at ulysses=2
                    compiled + CUDA graphs. The autotuning adds about 2 minutes of warm-up; in run V
                    (2 x H100) it was 2.4% slower. CPU dry run: --smoke --extra "--device cpu --tiny".
  flux-fastattn     ours on 1 GPU with DiTFastAttn: the plan calibrated at the default threshold on
                    the warm-up loop, and two fixed plans (steps shared, window + residual, each on
                    every other step) beside ours without it; relative error against no cache.
                    DiTFastAttn refuses sequence parallelism, so there is no multi-GPU row.
  sd3-4gpu          SD3-medium: diffusers and ours on 1 GPU; ours at cfg parallel x ulysses=2 and
                    ulysses=4 on 4 GPUs, cfg parallel and ulysses=2 on 2.
  sd3-graphs        SD3-medium with each of ours' forwards a CUDA graph: 1 GPU, cfg parallel and
                    ulysses=2 on 2 GPUs, beside the eager 1-GPU rows.
  sd3-medium        SD3-medium 1024x1024, 28 steps, cfg 4.5, eager (bench/sd3_loop.py): diffusers
                    1 GPU, ours 1 GPU, ours with cfg parallel on 2 GPUs and at ulysses=2.
  video-cogvideox   CogVideoX-5B at real size, 49 frames 480x720 (17550 video tokens), cfg 6.0, eager,
                    in SECONDS PER STEP (bench/video_loop.py): each row one sampling call of 1 warm-up
                    + 4 timed steps (--steps sets the timed steps), the median timed step of the
                    slowest rank; diffusers' CogVideoXPipeline 1 GPU, ours 1 GPU, ours with cfg
                    parallel on 2 GPUs and at ulysses=2; diffusers 1 GPU with each block compiled.
                    CPU dry run: --smoke --extra "--device cpu --tiny" --only 1gpu,ours-2gpu.
  video-cogvideox-4gpu  the same on 4 GPUs: the 1-GPU and 2-GPU rows, and ours at cfg parallel x
                    ulysses=2 and at ulysses=4. CPU dry run: --smoke --extra "--device cpu --tiny".

Writes to --out: results.jsonl (one row per line), table.md, group.log (every child's output),
profiles.txt (with --profile-steps). Multi-GPU launches keep NVLink multicast off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOOP = HERE / "flux_loop.py"
SD3_LOOP = HERE / "sd3_loop.py"
VIDEO_LOOP = HERE / "video_loop.py"
# Groups timed by another loop script than flux_loop.py.
GROUP_LOOPS = {"sd3-medium": SD3_LOOP, "sd3-4gpu": SD3_LOOP, "sd3-graphs": SD3_LOOP,
               "video-cogvideox": VIDEO_LOOP, "video-cogvideox-4gpu": VIDEO_LOOP}
# (steps, runs) of a group unless --steps / --runs say otherwise: video rows time a few steps
# (seconds each) after a warm-up step, inside one sampling call per run.
GROUP_STEPS_RUNS = {"video-cogvideox": (4, 1), "video-cogvideox-4gpu": (4, 1)}
DEFAULT_STEPS_RUNS = (28, 5)

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


GROUPS = ("flux-usp", "flux-usp-compile", "flux-usp-ring", "flux-pipefusion", "flux-4gpu", "flux-graphs", "flux-cache",
          "sd3-medium", "flux-4gpu-target", "sd3-4gpu", "sd3-graphs", "flux-tp", "flux-distrifusion",
          "flux-text-split", "flux-fastattn", "video-cogvideox", "video-cogvideox-4gpu", "flux-2gpu-peers",
          "flux-comm-overlap", "flux-pipefusion-graphs", "flux-head-chunks", "flux-autotune",
          "flux-pipefusion-interleaved")


def kill_tree(pid: int) -> None:
    """SIGKILL a launch and every process under it. Killing the launch's process group is not
    enough: torchrun starts its workers in sessions of their own, and in run O two workers outlived
    their killed torchrun for ten minutes, holding the launch's stdout open."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


PARAMETER_SPLIT = ["--pipefusion-split", "parameters"]  # PipeFusion rows measured before "auto" became the default


def launches(group: str) -> list[tuple[str, int, list[str]]]:
    """(name, processes, flux_loop arguments) for each launch of a group."""
    if group == "flux-usp":
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours", "--cond", "cpu,device"]),
            ("ours-2gpu", 2, ["--impl", "ours", "--degrees", "u2,r2"]),
            ("xdit-u2", 2, ["--impl", "xdit", "--degrees", "u2"]),
            ("xdit-r2", 2, ["--impl", "xdit", "--degrees", "r2"]),
        ]
    if group == "flux-usp-compile":
        return [
            ("ours-2gpu-compiled", 2, ["--impl", "ours", "--degrees", "u2,r2", "--compile", "--runs", "3"]),
            ("1gpu-compiled", 1, ["--impl", "diffusers,ours", "--compile", "--eager-baseline", "--runs", "3"]),
        ]
    if group == "flux-usp-ring":
        # The ring=2 pair again, back to back (eager rows on 2 GPUs vary by up to 10% run to run).
        return [
            ("ours-r2", 2, ["--impl", "ours", "--degrees", "r2"]),
            ("xdit-r2", 2, ["--impl", "xdit", "--degrees", "r2"]),
        ]
    if group == "flux-pipefusion":
        # PipeFusion=2 (M=2 patches, 1 warmup step) beside its baselines in the same run: peak
        # memory per GPU is the point (each GPU holds about half the weights).
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours"]),
            ("ours-u2", 2, ["--impl", "ours", "--degrees", "u2"]),
            ("ours-p2", 2, ["--impl", "ours", "--degrees", "p2"]),
        ]
    if group == "flux-pipefusion-graphs":
        # Issue 5's target: pipefusion=2 faster than one GPU. Eager it is host-bound (each stage
        # launches its layers' kernels once per patch); with each stage pass a CUDA graph. The
        # 1-GPU graphs row says how much of the gain is graphs alone. Median of 3 to fit 9 minutes.
        # The parameter split as in runs O and P, where this group was measured (the default is
        # now "auto", which gives Flux-dev the interleaved split: group flux-pipefusion-interleaved).
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours", "--runs", "3"]),
            ("ours-1gpu-graphs", 1, ["--impl", "ours", "--cuda-graphs", "--runs", "3"]),
            ("ours-p2", 2, ["--impl", "ours", "--degrees", "p2", *PARAMETER_SPLIT, "--runs", "3"]),
            ("ours-p2-graphs", 2, ["--impl", "ours", "--degrees", "p2", *PARAMETER_SPLIT, "--cuda-graphs", "--runs", "3"]),
            ("ours-p2-graphs-4patches", 2, ["--impl", "ours", "--degrees", "p2", *PARAMETER_SPLIT, "--cuda-graphs", "--pipeline-patches", "4",
                                            "--runs", "3"]),
            # Stages of even block count: the parameter split leaves stage 1 about 70% of the compute.
            ("ours-p2-graphs-compute-split", 2, ["--impl", "ours", "--degrees", "p2", "--cuda-graphs", "--pipefusion-split",
                                                 "compute", "--runs", "3"]),
        ]
    if group == "flux-pipefusion-interleaved":
        # Issue 5's target in one row: pipefusion=2 faster than one GPU AND half the parameter memory
        # per GPU. The compute split was faster (run P) but held 65% of the weights on one GPU.
        p2 = ["--impl", "ours", "--degrees", "p2", "--cuda-graphs", "--pipefusion-split"]
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours", "--runs", "3"]),
            ("ours-p2-graphs-compute-split", 2, [*p2, "compute", "--runs", "3"]),
            ("ours-p2-graphs-interleaved", 2, [*p2, "interleaved", "--runs", "3"]),
            ("ours-p2-graphs-interleaved-4patches", 2, [*p2, "interleaved", "--runs", "3", "--pipeline-patches", "4"]),
        ]
    if group == "flux-distrifusion":
        # DistriFusion beside the other ways to use 2 GPUs for one Flux-dev 1024px image (issue 10).
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours"]),
            ("ours-u2r2", 2, ["--impl", "ours", "--degrees", "u2,r2"]),
            ("ours-p2", 2, ["--impl", "ours", "--degrees", "p2"]),
            ("ours-d2", 2, ["--impl", "ours", "--degrees", "d2"]),
        ]
    if group == "flux-tp":
        # Tensor parallel beside the other ways to use 2 GPUs, with its 1-GPU baselines in the same run
        # (issue 10: diffusers' own DTensor tensor parallel took 20.2 s against 5.12 s on 1 GPU).
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours"]),
            ("ours-t2", 2, ["--impl", "ours", "--degrees", "t2"]),
            ("ours-u2", 2, ["--impl", "ours", "--degrees", "u2"]),
            ("ours-p2", 2, ["--impl", "ours", "--degrees", "p2"]),
            # 2 timed runs: at about 20 s a loop, 5 would not fit the group's 9 minutes.
            ("diffusers-t2", 2, ["--impl", "diffusers-tp", "--degrees", "t2", "--runs", "2"]),
        ]
    if group == "flux-4gpu":
        # Issue 11's run on one 4-GPU machine: median of 3 per row to fit the group in 9 minutes.
        # xDiT rows are eager only (as in issue 11's run; flux-2gpu-peers has xDiT compiled) and USP only (xfuser's Flux
        # pipeline runs PipeFusion synchronously only); our PipeFusion refuses compile.
        return [
            ("1gpu", 1, ["--impl", "diffusers", "--compile", "--eager-baseline", "--runs", "3"]),
            ("ours-4gpu", 4, ["--impl", "ours", "--degrees", "u4,r4,u2r2", "--runs", "3"]),
            ("ours-p2u2", 4, ["--impl", "ours", "--degrees", "p2u2", "--runs", "3"]),
            ("ours-4gpu-compiled", 4, ["--impl", "ours", "--degrees", "u4,r4,u2r2", "--compile", "--runs", "3"]),
            ("xdit-u4", 4, ["--impl", "xdit", "--degrees", "u4", "--runs", "3"]),
            ("xdit-r4", 4, ["--impl", "xdit", "--degrees", "r4", "--runs", "3"]),
            ("xdit-u2r2", 4, ["--impl", "xdit", "--degrees", "u2r2", "--runs", "3"]),
        ]
    if group == "flux-graphs":
        # CUDA graphs (ours) beside the eager and compiled rows they are meant to beat.
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours", "--compile", "--eager-baseline", "--runs", "3"]),
            ("ours-1gpu-graphs", 1, ["--impl", "ours", "--cuda-graphs", "--runs", "3"]),
            ("ours-4gpu-graphs", 4, ["--impl", "ours", "--degrees", "u4,r4,u2r2", "--cuda-graphs", "--runs", "3"]),
            ("ours-4gpu-compiled-graphs", 4, ["--impl", "ours", "--degrees", "u4,u2r2", "--compile", "--cuda-graphs",
                                              "--runs", "3"]),
        ]
    if group == "flux-4gpu-target":
        # Issue 11's target row (ulysses=4, compiled + CUDA graphs) beside the diffusers baseline
        # and xDiT in the same run. (SDPA already picks cuDNN attention on Hopper with torch 2.11:
        # bench/attention_kernels.py measured the same time for both, so no explicit-kernel row.)
        return [
            ("1gpu", 1, ["--impl", "diffusers", "--compile", "--eager-baseline", "--runs", "3"]),
            ("ours-u4-compiled-graphs", 4, ["--impl", "ours", "--degrees", "u4", "--compile", "--cuda-graphs", "--runs", "3"]),
            # 511 text tokens do not divide by 4: every rank keeps the whole text, as before the
            # text split; the pair shows what the split saves at this degree.
            ("ours-u4-compiled-graphs-text511", 4, ["--impl", "ours", "--degrees", "u4", "--compile", "--cuda-graphs",
                                                    "--text-len", "511", "--runs", "3"]),
            ("xdit-u4", 4, ["--impl", "xdit", "--degrees", "u4", "--runs", "3"]),
        ]
    if group == "sd3-4gpu":
        # Issue 11's SD3 row: cfg=2 x ulysses=2 on 4 GPUs beside 1 GPU and the 2-GPU rows.
        return [
            ("sd3-1gpu", 1, ["--impl", "diffusers,ours"]),
            ("sd3-ours-c2u2", 4, ["--impl", "ours", "--degrees", "c2u2,u4"]),
            ("sd3-ours-cfg2", 2, ["--impl", "ours", "--degrees", "c2,u2"]),
        ]
    if group == "sd3-graphs":
        # SD3-medium is host-bound eager (run I): the same rows with each forward a CUDA graph.
        return [
            ("sd3-1gpu", 1, ["--impl", "diffusers,ours"]),
            ("sd3-1gpu-graphs", 1, ["--impl", "ours", "--cuda-graphs"]),
            ("sd3-2gpu-graphs", 2, ["--impl", "ours", "--degrees", "c2,u2", "--cuda-graphs"]),
        ]
    if group == "sd3-medium":
        return [
            ("sd3-1gpu", 1, ["--impl", "diffusers,ours"]),
            ("sd3-ours-cfg2", 2, ["--impl", "ours", "--degrees", "c2"]),
            ("sd3-ours-u2", 2, ["--impl", "ours", "--degrees", "u2"]),
        ]
    if group == "flux-text-split":
        # What splitting the text across the ranks saves: 511 tokens do not divide by 2, so those
        # rows keep the whole text on every rank (one token less, otherwise the same work).
        rows = [("1gpu", 1, ["--impl", "diffusers,ours"])]
        for text in ("512", "511"):
            rows += [(f"ours-2gpu-text{text}", 2, ["--impl", "ours", "--degrees", "u2,r2", "--text-len", text]),
                     (f"ours-u2-compiled-graphs-text{text}", 2,
                      ["--impl", "ours", "--degrees", "u2", "--compile", "--cuda-graphs", "--text-len", text, "--runs", "3"])]
        return rows
    if group == "flux-2gpu-peers":
        # Issue 5: our 2-GPU rows beside what users would run instead, in the same run. Each launch
        # builds Flux-dev with random weights (20-30 s) and pays its compile warm-up (25-60 s), so the
        # eager and compiled rows of one implementation share a launch where the bench allows it
        # (--compile --eager-baseline times eager first, then compiles the same model). Estimated wall
        # time on an H100 pair, median of 3 (a loop takes about 5 s eager on 1 GPU, 2.5-4 s on 2),
        # start-up, build, warm-ups and timed runs of each launch:
        #   1gpu ~130 s (diffusers eager; compile; diffusers and ours compiled)
        #   diffusers-cp-u2 ~105 s (one 1-GPU reference loop per rank, eager, compile, compiled)
        #   xdit-u2 ~145 s (eager; xfuser compiles the whole transformer, not one block: 60-90 s)
        #   ours-u2-compiled-graphs ~90 s, ours-u2-graphs ~55 s (each with one more loop per mode
        #   for the CUDA graphs against eager check)
        # about 525 s, 8.8 minutes, in all. The rows that are ours alone would share a launch only if
        # --eager-baseline covered ours, which it does not (it would change older groups' rows).
        return [
            # compiled diffusers and ours take their runs in turn (--interleave): in run P's and Q's
            # profiles every kernel of whichever row ran second was 3-4% slower
            ("1gpu", 1, ["--impl", "diffusers,ours", "--compile", "--eager-baseline", "--interleave", "--runs", "3"]),
            ("diffusers-cp-u2", 2, ["--impl", "diffusers-cp", "--degrees", "u2", "--compile", "--eager-baseline",
                                    "--runs", "3"]),
            ("xdit-u2", 2, ["--impl", "xdit", "--degrees", "u2", "--compile", "--eager-baseline", "--runs", "3"]),
            ("ours-u2-compiled-graphs", 2, ["--impl", "ours", "--degrees", "u2", "--compile", "--cuda-graphs",
                                            "--runs", "3"]),
            ("ours-u2-graphs", 2, ["--impl", "ours", "--degrees", "u2", "--cuda-graphs", "--runs", "3"]),
        ]
    if group == "flux-comm-overlap":
        # The Ulysses all-to-alls run beside other work, each way against the plain row of the same
        # mode: each single block's all-to-all beside its MLP projection (--ulysses-overlap-mlp,
        # models/flux_overlap.py), the heads in 2 chunks whose all-to-alls run beside the other
        # chunk's attention (--ulysses-head-chunks 2, attention/ulysses_chunks.py), and both (the
        # engine's default, so the plain rows turn both off explicitly).
        u2 = ["--impl", "ours", "--degrees", "u2", "--cuda-graphs", "--runs", "3"]
        mlp, no_mlp = ["--ulysses-overlap-mlp"], ["--no-ulysses-overlap-mlp"]
        chunks, no_chunks = ["--ulysses-head-chunks", "2"], ["--ulysses-head-chunks", "1"]
        return [
            # the baseline, and the 1-GPU target: ours compiled + graphs against diffusers compiled
            ("1gpu-compiled", 1, ["--impl", "diffusers,ours", "--compile", "--cuda-graphs", "--interleave", "--runs", "3"]),
            ("ours-u2-compiled-graphs", 2, [*u2, "--compile", *no_mlp, *no_chunks]),
            ("ours-u2-compiled-graphs-mlp", 2, [*u2, "--compile", *mlp, *no_chunks]),
            ("ours-u2-compiled-graphs-mlp-chunks2", 2, [*u2, "--compile", *mlp, *chunks]),
            ("ours-u2-compiled-graphs-chunks2", 2, [*u2, "--compile", *no_mlp, *chunks]),
            ("ours-u2-graphs", 2, [*u2, *no_mlp, *no_chunks]),
            ("ours-u2-graphs-mlp", 2, [*u2, *mlp, *no_chunks]),
            ("ours-u2-graphs-mlp-chunks2", 2, [*u2, *mlp, *chunks]),
        ]
    if group == "flux-head-chunks":
        # How many head chunks pay? ours' default is 2 (auto_head_chunks); each more chunk hides more
        # of the first chunk's input all-to-all and the last chunk's output all-to-all, and runs
        # attention in smaller pieces. Flux-dev at ulysses=2 has 12 heads a rank.
        u2 = ["--impl", "ours", "--degrees", "u2", "--compile", "--cuda-graphs", "--runs", "3"]
        return [
            ("1gpu-compiled", 1, ["--impl", "diffusers,ours", "--compile", "--cuda-graphs", "--interleave", "--runs", "3"]),
            *[(f"ours-u2-compiled-graphs-chunks{c}", 2, [*u2, "--ulysses-head-chunks", str(c)]) for c in (1, 2, 3, 4, 6)],
        ]
    if group == "flux-autotune":
        # Do inductor's autotuned GEMMs (Triton templates, which can fuse the pointwise work around
        # them, against cuBLAS) pay? The same row with and without; the autotuning itself lengthens
        # the warm-up by minutes, so the pair is the whole group (a 1-GPU pair would pass 9 minutes).
        u2 = ["--impl", "ours", "--degrees", "u2", "--compile", "--cuda-graphs", "--runs", "3"]
        return [
            ("ours-u2-compiled-graphs", 2, u2),
            ("ours-u2-compiled-graphs-autotune", 2, [*u2, "--compile-autotune"]),
        ]
    if group == "flux-fastattn":
        return [("fastattn-1gpu", 1, ["--impl", "ours", "--cache", "none,ditfastattn,ditfastattn-share,ditfastattn-window",
                                      "--runs", "3"])]
    if group == "flux-cache":
        caches = "none,fbcache,teacache,fbcache-forced,teacache-forced"
        return [
            ("cache-1gpu", 1, ["--impl", "ours", "--cache", caches, "--runs", "3"]),
            ("cache-u2", 2, ["--impl", "ours", "--degrees", "u2", "--cache", caches, "--runs", "3"]),
        ]
    if group == "video-cogvideox":
        # Issue 7's video row: CogVideoX-5B on 1 and 2 GPUs (bench/video_loop.py, seconds per step).
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours"]),
            ("ours-2gpu", 2, ["--impl", "ours", "--degrees", "c2,u2"]),
            # ours refuses compile for CogVideoX: what regional compile gives diffusers, for reference
            ("1gpu-compiled", 1, ["--impl", "diffusers", "--compile"]),
        ]
    if group == "video-cogvideox-4gpu":
        return [
            ("1gpu", 1, ["--impl", "diffusers,ours"]),
            ("ours-2gpu", 2, ["--impl", "ours", "--degrees", "c2,u2"]),
            ("ours-4gpu", 4, ["--impl", "ours", "--degrees", "c2u2,u4"]),
        ]
    raise SystemExit(f"unknown group {group!r}; choose one of: " + ", ".join(GROUPS))


def steps_and_runs(group: str, args) -> tuple[int, int]:
    """The timed steps and runs of a group's launches: --smoke's 2 and 1, else --steps / --runs, else the group's."""
    if args.smoke:
        return 2, 1
    steps, runs = GROUP_STEPS_RUNS.get(group, DEFAULT_STEPS_RUNS)
    return args.steps or steps, args.runs or runs


def command(nproc: int, loop_args: list[str], loop: Path = LOOP) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(loop), *loop_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(loop), *loop_args]


def row_name(row: dict) -> str:
    who = {"diffusers": "plain diffusers", "ours": "ours (RankEngine)", "xdit": "xDiT (xfuser)",
           "diffusers-tp": "diffusers' tensor parallel (DTensor)",
           "diffusers-cp": "diffusers context parallel"}[row["impl"]]
    if row["gpus"] == 1:
        how = "1 GPU"
    else:
        parts = ["cfg parallel"] if row.get("cfg_parallel") else []
        parts += [f"ulysses={row['ulysses']}"] if row["ulysses"] > 1 else []
        parts += [f"ring={row['ring']}"] if row["ring"] > 1 else []
        split = row.get("pipefusion_split", "parameters")
        parts += [f"pipefusion={row['pipefusion']} (warmup {row.get('pipefusion_warmup', 1)}, "
                  f"{row.get('pipeline_patches', row['pipefusion'])} patches"
                  f"{'' if split == 'parameters' else f', {split} split'})"] if row.get("pipefusion", 1) > 1 else []
        parts += [f"tensor parallel={row['tensor']}"] if row.get("tensor", 1) > 1 else []
        parts += [f"distrifusion={row['distrifusion']} (warmup {row.get('distrifusion_warmup', 1)})"] if row.get("distrifusion", 1) > 1 else []
        how = f"{row['gpus']} GPUs, {' x '.join(parts)}"
    mode = "compiled" if row.get("compiled") else "eager"
    if row.get("compile_autotune"):
        mode += " (GEMMs autotuned)"
    if row.get("cuda_graphs"):
        mode += " + CUDA graphs"
    note = ", conditioning already on the GPU" if row.get("cond") == "device" else ""
    if row.get("attention_backend", "auto") != "auto":
        note += f", attention {row['attention_backend']}"
    if row.get("comm_overlap"):
        note += ", inductor's compute/communication reordering"
    if row["impl"] == "ours" and row["ulysses"] > 1 and row["ring"] == 1 and row.get("pipefusion", 1) == 1:
        note += f", {ulysses_overlaps(row)}"
    if row.get("interleaved"):
        note += ", timed in turn with the launch's other rows"
    if row.get("xfuser_compile_mode"):
        note += f" (xfuser's compile: whole transformer, mode {row['xfuser_compile_mode']})"
    if row.get("vs_1gpu_rel") is not None:
        note += f", latents vs 1 GPU rel. diff. {row['vs_1gpu_rel']:.1e}"
    if row.get("text_len", 512) != 512:
        note += f", {row['text_len']} text tokens"
    model = {"sd3-medium": "SD3-medium: ", "cogvideox-5b": "CogVideoX-5B: ",
             "cogvideox-tiny": "CogVideoX (tiny): "}.get(row.get("model"), "")
    return f"{model}{who}, {how}, {mode}{note}"


def ulysses_overlaps(row: dict) -> str:
    """What an ours Ulysses row ran beside its all-to-alls: flux_loop.ulysses_overlap_label's words
    (e.g. "head-chunks=2 overlap-mlp"), or the two keys of rows written before it (runs P and Q)."""
    parts = row.get("ulysses_overlaps", "").split()
    if "ulysses_overlaps" not in row:
        chunks = row.get("ulysses_head_chunks", 1)
        parts = ([f"head-chunks={chunks}"] if chunks > 1 else []) + (["overlap-mlp"] if row.get("ulysses_overlap_mlp") else [])
    words = [f"{part.split('=')[1]} head chunks" if part.startswith("head-chunks=") else "MLP"
             for part in parts]
    return f"overlaps: {' + '.join(words)}" if words else "no overlaps"


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["impl"] == "diffusers" and not r.get("compiled")), None)
    if len({r.get("model") for r in rows}) > 1:
        raise SystemExit("one table per model: run the sd3-medium group on its own")
    # xDiT at the same degrees and the same mode (eager or compiled) is each multi-GPU row's peer.
    xdit = {(r["ulysses"], r["ring"], bool(r.get("compiled"))): r for r in rows if r["impl"] == "xdit"}
    order = {"diffusers": 0, "ours": 1, "xdit": 2, "diffusers-tp": 3, "diffusers-cp": 4}
    rows = sorted(rows, key=lambda r: (r.get("compiled", False), r["gpus"], r["ring"], order[r["impl"]] if r["gpus"] == 1 else -order[r["impl"]]))
    # Video rows time single steps: the columns say so.
    time_column, times_column = ("s per step (median)", "timed steps (s)") if all(r.get("per_step") for r in rows) else ("s (median)", "runs")
    lines = [
        f"| run | {time_column} | {times_column} | speedup vs diffusers 1 GPU eager | time / xDiT same degree and mode | TFLOP/s per GPU | peak mem per GPU (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        peer = (xdit.get((r["ulysses"], r["ring"], bool(r.get("compiled"))))
                if r.get("pipefusion", 1) == 1 and r.get("tensor", 1) == 1 and r.get("distrifusion", 1) == 1 else None)
        ratio = f"{r['median_s'] / peer['median_s']:.3f}" if peer and r["impl"] != "xdit" and r["gpus"] > 1 else "-"
        runs = " / ".join(f"{t:.2f}" for t in r["times"])
        mem = max(r["peak_gib_per_rank"])
        lines.append(
            f"| {row_name(r)} | {r['median_s']:.3f} | {runs} | {speed} | {ratio} | {r['tflops_per_gpu']:.0f} | {mem:.1f} |"
        )
    return "\n".join(lines)


CACHE_NAMES = {
    "none": "no cache",
    "fbcache": "First-Block-Cache, threshold 0.08 (published default)",
    "teacache": "TeaCache, threshold 0.4 (published default)",
    "fbcache-forced": "First-Block-Cache, forced pattern (1.55x density)",
    "teacache-forced": "TeaCache, forced pattern (1.8x density)",
    "ditfastattn": "DiTFastAttn, plan calibrated at threshold 0.1 (ours) on the warm-up loop",
    "ditfastattn-share": "DiTFastAttn, fixed plan: attention shared across steps on every other step",
    "ditfastattn-window": "DiTFastAttn, fixed plan: window 64 + residual on every other step",
}


def cache_table(rows: list[dict]) -> str:
    """Cache rows: speedup against ours without cache at the same degrees, and the latents' error."""
    base = {(r["ulysses"], r["ring"]): r for r in rows if r.get("cache") == "none"}
    lines = [
        "| run | cache | computed / skipped calls (DiTFastAttn: layer-steps per method) | s (median) | runs | speedup vs no cache, same GPUs | rel. error vs no cache |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["gpus"], list(CACHE_NAMES).index(r["cache"]) if r["cache"] in CACHE_NAMES else 99)):
        ref = base.get((r["ulysses"], r["ring"]))
        speed = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else "-"
        error = f"{r['rel_error_vs_none']:.2e}" if "rel_error_vs_none" in r else "-"
        runs = " / ".join(f"{t:.2f}" for t in r["times"])
        how = "1 GPU" if r["gpus"] == 1 else f"{r['gpus']} GPUs, ulysses={r['ulysses']}"
        if "fastattn_plan" in r:  # DiTFastAttn runs every call; say how its attentions were computed
            calls = ", ".join(f"{method} {n}" for method, n in r["fastattn_plan"].items() if n)
        else:
            calls = f"{r['computed_calls']} / {r['skipped_calls']}"
        lines.append(f"| ours, {how}, eager | {CACHE_NAMES.get(r['cache'], r['cache'])} | {calls} "
                     f"| {r['median_s']:.3f} | {runs} | {speed} | {error} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", default="flux-usp")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "out"))
    p.add_argument("--runs", type=int, default=None, help="timed runs per row (default 5; video groups 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 28; video groups: 4 timed steps)")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 run per row: only checks that every row runs")
    p.add_argument("--profile-steps", type=int, default=0)
    p.add_argument("--only", default=None, help="comma list of launch names to run")
    p.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    p.add_argument("--extra", default="", help="extra flux_loop arguments for every launch (one string)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    log_path = out / "group.log"
    prof_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"flux_profiles_{os.getpid()}"
    common = ["--json", str(results), "--tag", args.group]
    if args.profile_steps:
        common += ["--profile-steps", str(args.profile_steps), "--profile-out", str(prof_dir)]
    if args.extra:
        common += args.extra.split()
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)

    only = set(args.only.split(",")) if args.only else None
    started = time.perf_counter()
    failures = []
    before = sum(1 for _ in open(results)) if results.exists() else 0
    with open(log_path, "a") as log:
        for group, name, nproc, loop_args in [(g, *x) for g in args.group.split(",") for x in launches(g)]:
            if only and name not in only:
                continue
            steps, runs = steps_and_runs(group, args)
            timing = ["--steps", str(steps), "--runs", str(runs)]
            cmd = command(nproc, timing + common + loop_args, GROUP_LOOPS.get(group, LOOP))  # a launch's own arguments win
            header = f"\n### {name}: {' '.join(cmd)}  ({time.perf_counter() - started:.0f} s into the group)\n"
            print(header, flush=True)
            log.write(header)
            log.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            # A watchdog, not wait(timeout): a launch that hangs with its stdout open (seen at NCCL
            # teardown after CUDA graphs) would otherwise keep the read loop below forever.
            watchdog = threading.Timer(args.timeout, kill_tree, (proc.pid,))
            watchdog.start()
            for line in proc.stdout:
                log.write(line)
                if not line.startswith("USDT:") and "is deprecated" not in line:
                    print(line, end="", flush=True)
            rc = proc.wait()
            if not watchdog.is_alive():
                rc = "timeout"
            watchdog.cancel()
            took = time.perf_counter() - t0
            msg = f"### {name}: exit {rc} after {took:.0f} s\n"
            print(msg, flush=True)
            log.write(msg)
            if rc != 0:
                failures.append(f"{name} (exit {rc})")

    rows = [json.loads(line) for i, line in enumerate(open(results)) if i >= before] if results.exists() else []
    text = (cache_table(rows) if all("cache" in r for r in rows) else table(rows)) if rows else "(no rows)"
    env_row = rows[0]["env"] if rows else {}
    xfuser_version = next((r["env"].get("xfuser") for r in rows if r["impl"] == "xdit"), None)
    if rows and all(r.get("per_step") for r in rows):
        r0 = rows[0]
        timing = (f"SECONDS PER STEP: each row the median of the timed steps listed ({r0['steps']} per sampling call x "
                  f"{r0['runs']} call(s); slowest rank per step) after {r0['warmup_steps']} warm-up step(s) in the same call")
    else:
        timing = (f"{steps_and_runs(args.group.split(',')[0], args)[0]} steps; each row the median of the runs listed "
                  "(slowest rank per run) after 1 warm-up")
    head = (
        f"group {args.group}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{env_row.get('gpu')}, torch {env_row.get('torch')} (CUDA {env_row.get('cuda')}), diffusers {env_row.get('diffusers')}, "
        f"yunchang {env_row.get('yunchang')}, xfuser {xfuser_version}; {timing}; group wall {time.perf_counter() - started:.0f} s"
    )
    if failures:
        head += f"; FAILED: {', '.join(failures)}"
    (out / "table.md").write_text(head + "\n\n" + text + "\n")
    if prof_dir.exists():
        with open(out / "profiles.txt", "a") as f:
            for path in sorted(prof_dir.glob("*.txt")):
                f.write(path.read_text() + "\n")
    print("\n" + head + "\n\n" + text, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
