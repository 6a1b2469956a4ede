"""``comfy-xdit demo`` through ComfyUI: the shipped text-to-image workflow posted to a real server.

It starts ComfyUI headless on loopback with the pack installed (the ComfyUI named by --comfyui
or $COMFYUI_PATH, else the pinned one tools/setup.sh installs), writes a small random Flux
transformer and a random Flux VAE into that server's model folders, posts
workflows/api/flux_txt2img_parallel.json (text encoders swapped for the demo conditioning node)
on one worker and on all workers, and prints both sampling times, the largest difference between
the two latents, and where the image was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .comfyui_server import ComfyServer, error_message, find_comfyui, shipped_workflow, status_str, with_demo_conditioning
from .config import ParallelConfig
from .demo import DEMO_MODEL, write_demo_checkpoint

WORKFLOW = "flux_txt2img_parallel"
# Flux's VAE architecture (stock VAELoader builds it at this width whatever the file says).
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)


def write_demo_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    if not path.exists():
        torch.manual_seed(1)
        vae = AutoencoderKL(**FLUX_VAE)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


def demo_graph(devices: str, steps: int, size: int, seed: int, config: ParallelConfig) -> dict:
    graph = with_demo_conditioning(shipped_workflow(WORKFLOW), DEMO_MODEL["joint_attention_dim"], DEMO_MODEL["pooled_projection_dim"])
    for node_id, node in list(graph.items()):
        inputs, cls = node["inputs"], node["class_type"]
        if cls == "ParallelLoader":
            inputs.update(model_name="demo_flux.safetensors", devices=devices, ulysses_degree=0,
                          ring_degree=config.ring_degree if "," in devices else 1, weight_dtype="float32")
        elif cls == "ParallelSampler":
            inputs.update(steps=steps, seed=seed)
            graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id, 0], "filename_prefix": f"demo_{devices.count(',') + 1}w"}}
        elif cls == "EmptySD3LatentImage":
            inputs.update(width=size, height=size)
        elif cls == "VAELoader":
            inputs["vae_name"] = "demo_flux_vae.safetensors"
        elif cls == "SaveImage":
            inputs["filename_prefix"] = "comfy_xdit_demo"
    return graph


def _outputs(server: ComfyServer, entry: dict, key: str) -> list[Path]:
    return [server.base / "output" / item.get("subfolder", "") / item["filename"]
            for out in entry["outputs"].values() for item in out.get(key, [])]


def _run(server: ComfyServer, graph: dict, label: str) -> tuple[dict, float]:
    entry = server.run(graph, timeout_s=1800)
    if status_str(entry) != "success":
        raise RuntimeError(f"{label}: the prompt failed: {error_message(entry)}\n(ComfyUI log: {server.log_path})")
    job = server.get("/comfy_xdit/status")["pools"][0]["last_job"]
    return entry, job["seconds"]


def run_comfyui_demo(args: argparse.Namespace, config: ParallelConfig) -> int:
    from safetensors.torch import load_file

    comfyui = find_comfyui(args.comfyui)
    out: Path = args.out.resolve()
    server = ComfyServer(out / "comfyui", comfyui)
    models = server.base / "models"
    write_demo_checkpoint(models / "diffusion_models" / "demo_flux.safetensors")
    write_demo_vae(models / "vae" / "demo_flux_vae.safetensors")
    all_devices = ",".join(config.devices)
    print(f"comfy-xdit demo through ComfyUI ({comfyui}): random Flux ({DEMO_MODEL['num_layers']}+"
          f"{DEMO_MODEL['num_single_layers']} blocks), {args.size}x{args.size}, {args.steps} steps, float32")
    print(f"starting ComfyUI on 127.0.0.1:{server.port} (log: {server.log_path}) ...", flush=True)
    server.start(cpu=config.device_type == "cpu")
    try:
        timings, latents, image = {}, {}, None
        for devices in (config.devices[0], all_devices):
            label = f"{devices.count(',') + 1} worker(s) [{devices}]"
            # The first prompt on a pool starts it and loads the model; time a warm one, as users get it.
            _run(server, demo_graph(devices, 1, args.size, args.seed + 1, config), label)
            entry, seconds = _run(server, demo_graph(devices, args.steps, args.size, args.seed, config), label)
            timings[devices] = seconds
            latents[devices] = load_file(str(_outputs(server, entry, "latents")[0]))["latent_tensor"]
            image = _outputs(server, entry, "images")[0]
            print(f"  {label}: sampled in {seconds:.2f} s", flush=True)
    finally:
        server.stop()
    one, many = timings[config.devices[0]], timings[all_devices]
    reference, result = latents[config.devices[0]], latents[all_devices]
    difference = float((result - reference).abs().max())
    relative = difference / float(reference.abs().max())
    print(f"1 worker:  {one:.2f} s (warm pool, sampling only)")
    print(f"{config.world_size} workers ({config.describe_degrees()}): {many:.2f} s (speedup {one / many:.2f}x)")
    print(f"max difference: {difference:.3e} (relative {relative:.3e})")
    print(f"image: {image}")
    return 0 if relative < 1e-4 else 1
