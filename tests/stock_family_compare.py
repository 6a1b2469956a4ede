"""The frame every per-family stock comparison script shares (stock_sd3/pixart/wan/qwen_image/hunyuan_video_compare.py).

Each script builds its files and cases; this module gives them the same command line, the same
ComfyUI start, one CPU worker of ours, the per-case error record (an exception becomes a failed
case with its traceback, so the test lists every case, not the first failure) and the JSON result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from stock_ksampler_compare import DEFAULT_COMFYUI, import_comfyui, relative_error

TOLERANCE = 1e-5  # what the printed ok/FAIL means; the tests assert their own bounds on the JSON


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--comfyui", type=Path, default=DEFAULT_COMFYUI)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def start_comfyui(args: argparse.Namespace):
    """Set the thread count and import stock ComfyUI (``--cpu``); returns (nodes, folder_paths, comfy)."""
    import torch

    torch.set_num_threads(args.threads)
    return import_comfyui(args.comfyui)


def one_cpu_worker(path: Path, family: str):
    """Our engine on one CPU worker in this process, with ``path`` loaded in float32."""
    import torch

    from comfy_xdit.config import ParallelConfig
    from comfy_xdit.engine import RankEngine
    from comfy_xdit.mesh import ParallelMesh
    from comfy_xdit.requests import ModelSpec

    engine = RankEngine(ParallelMesh.build(ParallelConfig(devices=("cpu",)), torch.device("cpu")))
    engine.load(ModelSpec(str(path), family=family, dtype="float32"))
    return engine


def record_case(case: dict, compare: Callable[[], tuple]) -> dict:
    """Run ``compare() -> (ours, stock)`` and put its errors (or the exception) into ``case``."""
    try:
        ours, stock = compare()
        case["rel_error"], case["abs_error"] = relative_error(ours, stock)
        case["stock_max"] = stock.abs().max().item()
    except Exception as error:  # noqa: BLE001 - recorded per case; the test lists them
        case["rel_error"] = math.inf
        case["error"] = f"{type(error).__name__}: {error}"
        case["traceback"] = traceback.format_exc(limit=6)
    print(f"{'ok  ' if case['rel_error'] < TOLERANCE else 'FAIL'} {case['name']:<80} rel {case['rel_error']:.2e}"
          + (f"  {case['error']}" if "error" in case else ""), file=sys.stderr, flush=True)
    return case


def write_result(args: argparse.Namespace, stock_info: dict, cases: list[dict], started: float) -> int:
    result = {"stock": stock_info, "cases": cases, "total_s": time.perf_counter() - started}
    text = json.dumps(result, indent=1, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    return 0


def run(main: Callable[[], int]) -> None:
    """The scripts' entry point: offline, exit with ``main``'s status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    sys.exit(main())
