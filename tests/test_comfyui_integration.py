"""The pack inside a real ComfyUI (0.3.75, headless, CPU): nodes, workflows, API, faults.

One server and one warm pool serve the whole module. The shipped API workflows run with their
text-encoder nodes replaced by the test-only conditioning node (DESIGN.md: stock encoders build
full-size T5 whatever file they get) and their model names pointed at small random files.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cogvideox_files import make_cogvideox_model, make_cogvideox_vae, write_cogvideox_folder
from consisid_files import face_image, identity, make_consisid_model, write_consisid_folder
from checkpoints import (make_flux_diffusers_model, make_hunyuan_video_diffusers_model, make_qwen_image_diffusers_model,
                         make_sd3_diffusers_model, make_wan_diffusers_model, sd3_checkpoint_extras, write_bfl_file,
                         write_hunyuan_video_file, write_qwen_image_file, write_sd3_file, write_wan_file)
from checkpoints import make_mochi_diffusers_model, write_mochi_file
from comfy_xdit.comfyui_server import COMFYUI, ComfyServer, error_message, status_str, with_demo_conditioning
from comfy_xdit.comfyui_server import shipped_workflow as load_workflow
from dit_files import make_dit_model, write_dit_folder
from latte_files import make_latte_model, make_latte_vae, write_latte_folder
from controlnet_files import make_flux_controlnet, write_instantx_file, write_sd15_controlnet_file
from lora_files import random_flux_lora, write_peft_lora, write_sd15_lora
from hunyuan_dit_files import make_hunyuan_dit_diffusers_model, write_original_hunyuan_dit_file
from pixart_files import make_pixart_diffusers_model, write_original_pixart_file
from vae_files import make_ldm_encoder_state_dict, make_ldm_vae_state_dict
from wan_vae_file import write_wan_vae_file

pytestmark = pytest.mark.skipif(not (COMFYUI / "main.py").exists(), reason="tools/setup.sh installs the test ComfyUI")

NODES = ("ParallelLoader", "ParallelLoraLoader", "ParallelControlNetLoader", "ParallelControlNetApply", "ParallelSampler",
         "ParallelVAEDecode", "ParallelClassLabel", "ParallelFolderVAEDecode", "ParallelConsisIDIdentity")
CONTEXT_DIM, POOLED_DIM = 32, 24


def write_models(models) -> torch.nn.Module:
    """The tiny Flux (diffusion_models) and SD3.5 (checkpoints) files and the VAE; returns the Flux model."""
    model = make_flux_diffusers_model(num_layers=1, num_single_layers=1, heads=4, head_dim=16, seed=0,
                                      joint_attention_dim=CONTEXT_DIM, pooled_projection_dim=POOLED_DIM)
    write_bfl_file(model, models / "diffusion_models" / "tiny_flux.safetensors", prefix="model.diffusion_model.")
    # A whole SD3.5-style checkpoint (transformer under model.diffusion_model., encoders and VAE beside it).
    sd3 = make_sd3_diffusers_model(num_layers=2, heads=2, head_dim=16, dual_attention_layers=(0,), qk_norm="rms_norm",
                                   joint_attention_dim=CONTEXT_DIM, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=8, seed=5)
    write_sd3_file(sd3, models / "checkpoints" / "tiny_sd35.safetensors", prefix="model.diffusion_model.",
                   extra=sd3_checkpoint_extras())
    # A PixArt-Sigma-style file in the original layout (16 heads, as ComfyUI assumes).
    write_original_pixart_file(make_pixart_diffusers_model(num_layers=1, heads=16, head_dim=2, caption_channels=CONTEXT_DIM, seed=6),
                               models / "diffusion_models" / "tiny_pixart_sigma.safetensors")
    # With an encoder: the ControlNet workflow VAE-encodes its control image with it.
    save_file({**make_ldm_vae_state_dict(seed=2), **make_ldm_encoder_state_dict(seed=4)}, str(models / "vae" / "tiny_ae.safetensors"))
    return model


# Diffusers folders as users copy them into models/diffusion_models; ComfyUI lists the files inside.
DIT_NAME = "tiny_dit/transformer/diffusion_pytorch_model.safetensors"
COGVIDEOX_NAME = "tiny_cogvideox/transformer/diffusion_pytorch_model.safetensors"
LATTE_NAME = "tiny_latte/transformer/diffusion_pytorch_model.safetensors"


def write_diffusers_folders(models) -> None:
    """A DiT folder (transformer/ + scheduler/) with a 4-channel SD VAE for the stock decode (full width: stock
    VAELoader builds every LDM VAE at 128 base channels; fp16 halves the file), and a CogVideoX-5b-style folder
    (rotary: any text length) with its own tiny vae/ beside transformer/ and scheduler/."""
    write_dit_folder(models / "diffusion_models" / "tiny_dit", model=make_dit_model(num_layers=1, seed=9))
    save_file(make_ldm_vae_state_dict(seed=9, dtype=torch.float16, z_channels=4), str(models / "vae" / "tiny_sd_vae.safetensors"))
    root = write_cogvideox_folder(models / "diffusion_models" / "tiny_cogvideox",
                                  model=make_cogvideox_model(text_dim=CONTEXT_DIM, seed=10))
    make_cogvideox_vae(scaling_factor=0.7, seed=11).save_pretrained(root / "vae", safe_serialization=True)
    # A Latte-1-style folder (3 frames) with a tiny SD-style AutoencoderKL as its vae/.
    root = write_latte_folder(models / "diffusion_models" / "tiny_latte", model=make_latte_model(seed=12, text_dim=CONTEXT_DIM))
    make_latte_vae(seed=13).save_pretrained(root / "vae", safe_serialization=True)


CONSISID_NAME = "tiny_consisid/transformer/diffusion_pytorch_model.safetensors"


def write_consisid_files(base) -> None:
    """A tiny ConsisID folder (transformer/ + scheduler/ + vae/), its identity file in models/consisid_identity
    and a face image in input/ (another size than the video: the identity node resizes it as the pipeline does)."""
    from comfy_xdit.consisid_identity import save_identity_file

    write_consisid_folder(base / "models" / "diffusion_models" / "tiny_consisid", make_consisid_model(text_dim=CONTEXT_DIM, seed=12))
    (base / "models" / "consisid_identity").mkdir(parents=True, exist_ok=True)
    save_identity_file(base / "models" / "consisid_identity" / "face.safetensors", *identity(seed=13))
    (base / "input").mkdir(parents=True, exist_ok=True)
    Image.fromarray((face_image(56, 40)[0] * 255).round().byte().numpy()).save(base / "input" / "face.png")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    server = ComfyServer(base)
    models = base / "models"
    model = write_models(models)
    write_peft_lora(random_flux_lora(model, seed=1, dtype=torch.float32), models / "loras" / "tiny_lora.safetensors")
    write_sd15_lora(models / "loras" / "sd15_lora.safetensors")
    controlnet = make_flux_controlnet(num_layers=1, num_single_layers=1, heads=4, head_dim=16, seed=5,
                                      joint_attention_dim=CONTEXT_DIM, pooled_projection_dim=POOLED_DIM)
    write_instantx_file(controlnet, models / "controlnet" / "tiny_flux_controlnet.safetensors")
    write_sd15_controlnet_file(models / "controlnet" / "sd15_canny.safetensors")
    # Wan 2.1 T2V in the original layout with ComfyUI's prefix (width 256: Wan's heads are 128 wide), and a
    # tiny Wan 2.1 VAE that stock VAELoader + VAEDecode take.
    wan = make_wan_diffusers_model(num_layers=1, heads=2, head_dim=128, ffn_dim=64, text_dim=CONTEXT_DIM, freq_dim=32, seed=6)
    write_wan_file(wan, models / "diffusion_models" / "tiny_wan.safetensors", prefix="model.diffusion_model.")
    write_wan_vae_file(models / "vae" / "tiny_wan_vae.safetensors")
    # Qwen-Image as ComfyUI keeps it (its prefix); it decodes with the same Wan 2.1 VAE.
    qwen = make_qwen_image_diffusers_model(num_layers=1, heads=2, head_dim=32, joint_attention_dim=CONTEXT_DIM, seed=7)
    write_qwen_image_file(qwen, models / "diffusion_models" / "tiny_qwen_image.safetensors", prefix="model.diffusion_model.")
    # HunyuanVideo 1.0 T2V in the original layout with ComfyUI's prefix (width 256: its heads are 128 wide).
    hunyuan = make_hunyuan_video_diffusers_model(num_layers=1, num_single_layers=1, num_refiner_layers=1, heads=2, head_dim=128,
                                                 rope_axes_dim=(16, 56, 56), text_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM, seed=8)
    write_hunyuan_video_file(hunyuan, models / "diffusion_models" / "tiny_hunyuan_video.safetensors", prefix="model.diffusion_model.")
    write_diffusers_folders(models)
    write_consisid_files(base)
    # Mochi 1 preview in Genmo's layout with ComfyUI's prefix (asymmetric: video stream 16 wide, text stream 8).
    mochi = make_mochi_diffusers_model(num_layers=2, heads=2, head_dim=8, pooled_dim=8, text_dim=CONTEXT_DIM, seed=9)
    write_mochi_file(mochi, models / "diffusion_models" / "tiny_mochi.safetensors", prefix="model.diffusion_model.")
    # HunyuanDiT v1.2-style in the original layout (16 heads, as ComfyUI assumes; the stock encoders' 77 + 256 tokens).
    hunyuan_dit = make_hunyuan_dit_diffusers_model(num_layers=4, heads=16, head_dim=4, text_width=CONTEXT_DIM,
                                                   t5_width=2 * CONTEXT_DIM, pooled=16, text_len=77, text_len_t5=256,
                                                   meta=False, seed=9)
    write_original_hunyuan_dit_file(hunyuan_dit, models / "checkpoints" / "tiny_hunyuan_dit.safetensors",
                                    prefix="model.diffusion_model.")
    # A file in the DiT folder that is not a DiT: a VAE.
    save_file(make_ldm_vae_state_dict(seed=3), str(models / "diffusion_models" / "not_a_dit.safetensors"))
    Image.new("RGB", (64, 48), (200, 60, 40)).save(base / "input" / "example.png")
    server.start()
    yield server
    server.stop()


def shipped_workflow(name: str, **loader) -> dict:
    graph = with_demo_conditioning(load_workflow(name), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="tiny_flux.safetensors", devices="cpu,cpu", **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=3)
        elif cls == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=48)
        elif cls == "VAELoader":
            node["inputs"]["vae_name"] = "tiny_ae.safetensors"
        elif cls == "ParallelLoraLoader":
            node["inputs"]["lora_name"] = "tiny_lora.safetensors"
        elif cls == "ParallelControlNetLoader":
            node["inputs"]["control_net_name"] = "tiny_flux_controlnet.safetensors"
    return graph


def node_of(graph: dict, cls: str) -> dict:
    return next(node for node in graph.values() if node["class_type"] == cls)


def pool_status(server) -> dict:
    pools = server.get("/comfy_xdit/status")["pools"]
    assert len(pools) == 1, pools
    return pools[0]


def test_comfyui_lists_every_node_and_logs_no_import_failure(server):
    info = server.get("/object_info")
    for name in NODES:
        assert name in info, f"{name} missing from /object_info"
    assert "XDIT_MODEL" in info["ParallelLoader"]["output"]
    failures = [line for line in server.log().splitlines() if "IMPORT FAILED" in line and "comfy_xdit" in line]
    assert not failures, failures


@pytest.mark.parametrize("name", ["flux_txt2img_parallel", "flux_lora_parallel", "flux_img2img_parallel",
                                  "flux_controlnet_parallel"])
def test_shipped_workflow_runs_and_writes_its_image(server, name):
    graph = shipped_workflow(name)
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, entry["outputs"]
    path = server.base / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    assert Image.open(path).size in ((64, 48), (48, 64))


def test_a_new_seed_reloads_nothing(server):
    graph = shipped_workflow("flux_txt2img_parallel")
    assert status_str(server.run(graph)) == "success"
    before = pool_status(server)
    node_of(graph, "ParallelSampler")["inputs"]["seed"] = 12345
    assert status_str(server.run(graph)) == "success"
    after = pool_status(server)
    assert after["load_count"] == before["load_count"] == 1
    assert after["generation"] == before["generation"]  # same workers, not a restarted pool
    assert after["jobs_done"] > before["jobs_done"]


def save_latent_graph(devices: str, seed: int, **loader) -> dict:
    graph = shipped_workflow("flux_txt2img_parallel", **loader)
    node_of(graph, "ParallelLoader")["inputs"]["devices"] = devices
    node_of(graph, "ParallelSampler")["inputs"].update(seed=seed, cfg=2.0)
    for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "ParallelVAEDecode", "SaveImage")]:
        del graph[node_id]
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"latent_{devices}_{seed}"}}
    return graph


def saved_latent(server, entry) -> torch.Tensor:
    info = next(out for out in entry["outputs"].values() if "latents" in out)["latents"][0]
    return load_file(str(server.base / "output" / info.get("subfolder", "") / info["filename"]))["latent_tensor"]


def test_two_workers_give_the_latents_of_one(server):
    two = server.run(save_latent_graph("cpu,cpu", 7))
    one = server.run(save_latent_graph("cpu", 7))
    assert status_str(two) == status_str(one) == "success", error_message(two) + error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_the_loader_takes_the_pipefusion_split_and_a_workflow_without_it_still_runs(server):
    split = server.get("/object_info/ParallelLoader")["ParallelLoader"]["input"]["optional"]["pipefusion_split"]
    assert all(f"'{name}'" in str(split) for name in ("auto", "parameters", "compute", "interleaved"))
    assert split[1]["default"] == "auto"
    without = save_latent_graph("cpu", 7)
    assert "pipefusion_split" not in node_of(without, "ParallelLoader")["inputs"]  # as saved before the input existed
    # Warmup on every step: PipeFusion is exact, so the compute split must give one worker's latents.
    with_split = save_latent_graph("cpu,cpu", 7, pipefusion_parallel_degree=2, warmup_steps=3, pipefusion_split="compute")
    two, one = server.run(with_split), server.run(without)
    assert status_str(two) == status_str(one) == "success", error_message(two) + error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_sampler_cache_skips_steps_and_two_workers_give_the_latents_of_one(server):
    # A threshold this tiny random model crosses rarely, so the cache skips steps (the latents
    # differ from the uncached ones) and the 2-worker pool must skip the same ones as 1 worker.
    def graph(devices: str, cache: str) -> dict:
        g = save_latent_graph(devices, 11)
        node_of(g, "ParallelSampler")["inputs"].update(cache=cache, cache_threshold=1.0)
        return g

    two, one, none = (server.run(graph(d, c)) for d, c in (("cpu,cpu", "fbcache"), ("cpu", "fbcache"), ("cpu", "none")))
    for entry in (two, one, none):
        assert status_str(entry) == "success", error_message(entry)
    a, b, uncached = (saved_latent(server, e) for e in (two, one, none))
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4
    assert float((b - uncached).abs().max() / uncached.abs().max()) > 1e-3


def test_wrong_degrees_are_a_node_error_and_the_server_keeps_serving(server):
    graph = shipped_workflow("flux_txt2img_parallel", ulysses_degree=3)
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "multiply to 3 workers" in error_message(entry)
    assert status_str(server.run(shipped_workflow("flux_txt2img_parallel"))) == "success"


def test_a_file_that_is_not_a_dit_is_refused_clearly(server):
    graph = shipped_workflow("flux_txt2img_parallel")
    node_of(graph, "ParallelLoader")["inputs"]["model_name"] = "not_a_dit.safetensors"
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "not a checkpoint of a supported model family" in error_message(entry)


def test_unimplemented_conditioning_features_are_refused_by_name(server):
    graph = shipped_workflow("flux_txt2img_parallel")
    positive = node_of(graph, "ParallelSampler")["inputs"]["positive"]
    graph["80"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": positive, "start": 0.0, "end": 0.5}}
    node_of(graph, "ParallelSampler")["inputs"]["positive"] = ["80", 0]
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "'start_percent' (ConditioningSetTimestepRange)" in error_message(entry)


def _wait_for_progress(server, minimum_step: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pools = server.get("/comfy_xdit/status")["pools"]
        job = pools[0].get("current_job") if pools else None
        if job and job.get("step", 0) >= minimum_step:
            return
        time.sleep(0.05)
    raise TimeoutError("sampling never reached the step")


def long_job(server, seed: int) -> str:
    graph = shipped_workflow("flux_txt2img_parallel")
    node_of(graph, "ParallelSampler")["inputs"].update(steps=200, seed=seed)
    return server.submit(graph)


def test_interrupt_stops_the_prompt_and_the_next_one_succeeds(server):
    prompt_id = long_job(server, 1001)
    _wait_for_progress(server, 2)
    started = time.monotonic()
    server.post("/interrupt")
    entry = server.wait(prompt_id, timeout_s=30)
    assert time.monotonic() - started < 10
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert status_str(server.run(shipped_workflow("flux_txt2img_parallel"))) == "success"


def test_a_killed_worker_is_an_execution_error_and_the_next_prompt_succeeds(server):
    prompt_id = long_job(server, 2002)
    _wait_for_progress(server, 2)
    pid = pool_status(server)["workers"][1]["pid"]
    os.kill(pid, signal.SIGKILL)
    entry = server.wait(prompt_id, timeout_s=30)
    assert status_str(entry) == "error"
    assert "rank 1" in error_message(entry) and "SIGKILL" in error_message(entry)
    assert status_str(server.run(shipped_workflow("flux_txt2img_parallel"))) == "success"


def lora_latent_graph(strength: float, lora_name: str = "tiny_lora.safetensors") -> dict:
    graph = shipped_workflow("flux_lora_parallel")
    node_of(graph, "ParallelLoraLoader")["inputs"].update(strength_model=strength, lora_name=lora_name)
    node_of(graph, "ParallelSampler")["inputs"]["seed"] = 31
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
    for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "ParallelVAEDecode", "SaveImage")]:
        del graph[node_id]
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"lora_{strength}"}}
    return graph


def test_a_lora_strength_change_repatches_the_lora_and_reloads_nothing(server):
    full = server.run(lora_latent_graph(1.0))
    assert status_str(full) == "success", error_message(full)
    before = pool_status(server)
    half = server.run(lora_latent_graph(0.5))
    assert status_str(half) == "success", error_message(half)
    after = pool_status(server)
    assert after["load_count"] == before["load_count"] and after["generation"] == before["generation"]
    assert after["lora_apply_count"] == before["lora_apply_count"] + 1
    assert not torch.equal(saved_latent(server, full), saved_latent(server, half))


def test_a_lora_for_another_model_is_a_node_error(server):
    entry = server.run(lora_latent_graph(1.0, "sd15_lora.safetensors"))
    assert status_str(entry) == "error"
    assert "matches none of this Flux model's layers" in error_message(entry)


def controlnet_latent_graph(strength: float, control_net_name: str = "tiny_flux_controlnet.safetensors") -> dict:
    graph = shipped_workflow("flux_controlnet_parallel")
    node_of(graph, "ParallelControlNetApply")["inputs"]["strength"] = strength
    node_of(graph, "ParallelControlNetLoader")["inputs"]["control_net_name"] = control_net_name
    node_of(graph, "ParallelSampler")["inputs"]["seed"] = 41
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
    for node_id in [k for k, n in graph.items() if n["class_type"] in ("ParallelVAEDecode", "SaveImage")]:
        del graph[node_id]
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"controlnet_{strength}"}}
    return graph


def test_a_controlnet_strength_change_reloads_neither_model_nor_controlnet(server):
    first = server.run(controlnet_latent_graph(0.7))
    assert status_str(first) == "success", error_message(first) + server.log()[-2000:]
    before = pool_status(server)
    second = server.run(controlnet_latent_graph(0.4))
    assert status_str(second) == "success", error_message(second)
    after = pool_status(server)
    assert after["generation"] == before["generation"] and after["load_count"] == before["load_count"]
    assert after["controlnet_load_count"] == before["controlnet_load_count"] >= 1
    assert not torch.equal(saved_latent(server, first), saved_latent(server, second))


def test_a_non_flux_controlnet_is_refused_by_name_and_the_server_keeps_serving(server):
    entry = server.run(controlnet_latent_graph(0.7, "sd15_canny.safetensors"))
    assert status_str(entry) == "error"
    assert "UNet ControlNet for SD1.5/SDXL" in error_message(entry) and "not a Flux ControlNet" in error_message(entry)
    assert status_str(server.run(controlnet_latent_graph(0.5))) == "success"


# --- Stable Diffusion 3 / 3.5 (kept last: they replace the Flux pool above) ------------------------


def sd3_workflow(**loader) -> dict:
    graph = with_demo_conditioning(load_workflow("sd3_txt2img_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="checkpoints/tiny_sd35.safetensors", devices="cpu,cpu", **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=3)
        elif cls == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=48)
        elif cls == "VAELoader":
            node["inputs"]["vae_name"] = "tiny_ae.safetensors"
    return graph


def test_sd3_workflow_runs_with_cfg_parallel_on_two_workers(server):
    graph = sd3_workflow()
    assert node_of(graph, "XditTestSD3Conditioning")
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert Image.open(server.base / "output" / images[0].get("subfolder", "") / images[0]["filename"]).size == (64, 48)
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "sd3"


def test_sd3_two_workers_give_the_latents_of_one(server):
    def latent_graph(devices: str, **loader) -> dict:
        graph = sd3_workflow(**loader)
        node_of(graph, "ParallelLoader")["inputs"]["devices"] = devices
        node_of(graph, "ParallelSampler")["inputs"]["seed"] = 11
        sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
        for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "ParallelVAEDecode", "SaveImage")]:
            del graph[node_id]
        graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"sd3_{devices}"}}
        return graph

    two = server.run(latent_graph("cpu,cpu"))
    one = server.run(latent_graph("cpu", use_cfg_parallel=False))
    assert status_str(two) == status_str(one) == "success", error_message(two) + error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert a.shape == (1, 16, 6, 8)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_flux_conditioning_into_sd3_is_refused_with_what_to_change(server):
    graph = sd3_workflow()
    for node in graph.values():
        if node["class_type"] == "XditTestSD3Conditioning":
            node["class_type"] = "XditTestFluxConditioning"
            node["inputs"].update(pooled_dim=768, guidance=3.5)
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "pooled output are 768 wide but this Stable Diffusion 3 / 3.5 model takes 24" in error_message(entry)


# --- PixArt-alpha / Sigma (they replace the pool above too) ----------------------------------------


def pixart_latent_workflow(devices: str, **loader) -> dict:
    """The shipped PixArt workflow up to the sampler, its latent saved (the stock VAEDecode is not ours to test)."""
    graph = with_demo_conditioning(load_workflow("pixart_txt2img_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="tiny_pixart_sigma.safetensors", devices=devices, **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=3, seed=13)
        elif cls == "EmptyLatentImage":
            node["inputs"].update(width=320, height=288)  # ComfyUI's PixArt needs (w + h) / 2 above 256 px
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
    for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "VAEDecode", "SaveImage")]:
        del graph[node_id]
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"pixart_{devices}"}}
    return graph


def test_pixart_workflow_with_cfg_parallel_gives_the_latents_of_one_worker(server):
    assert load_workflow("pixart_txt2img_parallel")["9"]["class_type"] == "VAEDecode"
    graph = pixart_latent_workflow("cpu,cpu")
    assert node_of(graph, "XditTestPixArtConditioning")
    two = server.run(graph)
    assert status_str(two) == "success", error_message(two) + server.log()[-2000:]
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "pixart"
    one = server.run(pixart_latent_workflow("cpu", use_cfg_parallel=False))
    assert status_str(one) == "success", error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert a.shape == (1, 4, 36, 40) and b.abs().max() > 0.1
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_flux_conditioning_into_pixart_is_refused_with_what_to_change(server):
    graph = pixart_latent_workflow("cpu,cpu")
    for node in graph.values():
        if node["class_type"] == "XditTestPixArtConditioning":
            node["class_type"] = "XditTestFluxConditioning"
            node["inputs"].update(context_dim=4096, pooled_dim=768, guidance=3.5)
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "text tokens are 4096 wide but this PixArt-alpha / PixArt-Sigma model takes 32" in error_message(entry)


# --- Wan 2.1 / 2.2 text-to-video --------------------------------------------------------------------


def wan_workflow(**loader) -> dict:
    graph = with_demo_conditioning(load_workflow("wan_txt2video_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="tiny_wan.safetensors", devices="cpu,cpu", **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "EmptyHunyuanLatentVideo":
            node["inputs"].update(width=80, height=48, length=9)  # latent [1, 16, 3, 6, 10]
        elif cls == "VAELoader":
            node["inputs"]["vae_name"] = "tiny_wan_vae.safetensors"
    return graph


def test_wan_video_workflow_runs_with_cfg_parallel_and_stock_vae_decode(server):
    graph = wan_workflow()
    assert node_of(graph, "XditTestWanConditioning") and node_of(graph, "VAEDecode")
    decode_id = next(k for k, n in graph.items() if n["class_type"] == "VAEDecode")
    # The frames one by one too (an animated WebP merges identical frames of a random VAE).
    graph["91"] = {"class_type": "SaveImage", "inputs": {"images": [decode_id, 0], "filename_prefix": "wan_frames"}}
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    video = entry["outputs"][next(k for k, n in graph.items() if n["class_type"] == "SaveAnimatedWEBP")]["images"][0]
    assert Image.open(server.base / "output" / video.get("subfolder", "") / video["filename"]).size == (80, 48)
    assert len(entry["outputs"]["91"]["images"]) == 9  # 3 latent frames: 1 + 2 x 4 video frames
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "wan"


def test_wan_two_workers_give_the_video_latents_of_one(server):
    def latent_graph(devices: str, **loader) -> dict:
        graph = wan_workflow(**loader)
        node_of(graph, "ParallelLoader")["inputs"]["devices"] = devices
        node_of(graph, "ParallelSampler")["inputs"]["seed"] = 13
        sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
        for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "VAEDecode", "SaveAnimatedWEBP")]:
            del graph[node_id]
        graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"wan_{devices}"}}
        return graph

    # Two workers as Ulysses this time (the shipped workflow's cfg parallel ran above).
    two = server.run(latent_graph("cpu,cpu", use_cfg_parallel=False, ulysses_degree=2))
    one = server.run(latent_graph("cpu", use_cfg_parallel=False))
    assert status_str(two) == status_str(one) == "success", error_message(two) + error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert a.shape == (1, 16, 3, 6, 10)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_a_video_latent_into_parallel_vae_decode_names_the_stock_node(server):
    graph = wan_workflow()
    decode = node_of(graph, "VAEDecode")
    decode["class_type"] = "ParallelVAEDecode"
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "for a video latent use the stock VAE Decode node (Wan, HunyuanVideo)" in error_message(entry)


# --- Qwen-Image text-to-image ---------------------------------------------------------------------


def qwen_image_workflow(**loader) -> dict:
    graph = with_demo_conditioning(load_workflow("qwen_image_txt2img_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="tiny_qwen_image.safetensors", devices="cpu,cpu", **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=48)  # latent [1, 16, 6, 8]: 3 x 4 tokens
        elif cls == "VAELoader":
            node["inputs"]["vae_name"] = "tiny_wan_vae.safetensors"
    return graph


def test_qwen_image_workflow_runs_with_cfg_parallel_and_stock_vae_decode(server):
    graph = qwen_image_workflow()
    assert node_of(graph, "XditTestWanConditioning") and node_of(graph, "VAEDecode")
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    image = entry["outputs"][next(k for k, n in graph.items() if n["class_type"] == "SaveImage")]["images"]
    assert len(image) == 1
    assert Image.open(server.base / "output" / image[0].get("subfolder", "") / image[0]["filename"]).size == (64, 48)
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "qwen_image"


def test_qwen_image_two_workers_give_the_latents_of_one(server):
    def latent_graph(devices: str, **loader) -> dict:
        graph = qwen_image_workflow(**loader)
        node_of(graph, "ParallelLoader")["inputs"]["devices"] = devices
        node_of(graph, "ParallelSampler")["inputs"]["seed"] = 17
        sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
        for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "VAEDecode", "SaveImage")]:
            del graph[node_id]
        graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"qwen_{devices}"}}
        return graph

    # Two workers as Ring this time (the shipped workflow's cfg parallel ran above).
    two = server.run(latent_graph("cpu,cpu", use_cfg_parallel=False, ulysses_degree=1, ring_degree=2))
    one = server.run(latent_graph("cpu", use_cfg_parallel=False))
    assert status_str(two) == status_str(one) == "success", error_message(two) + error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert a.shape == (1, 16, 1, 6, 8)  # stock KSampler's one-frame latent for Qwen-Image
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_wan_conditioning_width_into_qwen_image_is_refused_with_what_to_change(server):
    graph = qwen_image_workflow()
    for node in graph.values():
        if node["class_type"] == "XditTestWanConditioning":
            node["inputs"]["context_dim"] = 4096
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "text tokens are 4096 wide but this Qwen-Image text-to-image model takes 32" in error_message(entry)


# --- HunyuanVideo 1.0 text-to-video ---------------------------------------------------------------


def hunyuan_video_workflow(**loader) -> dict:
    graph = with_demo_conditioning(load_workflow("hunyuan_video_txt2video_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="tiny_hunyuan_video.safetensors", devices="cpu,cpu", **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "EmptyHunyuanLatentVideo":
            node["inputs"].update(width=80, height=48, length=9)  # latent [1, 16, 3, 6, 10]
        elif cls == "VAELoader":
            # ComfyUI fixes the HunyuanVideo VAE at its full width (128 base channels); the tiny Wan 2.1 VAE has
            # the same latent layout (16 channels, 4x frames, 8x pixels) and stands in for it in the stock decode.
            node["inputs"]["vae_name"] = "tiny_wan_vae.safetensors"
    return graph


def test_hunyuan_video_workflow_runs_on_ulysses_with_flux_guidance_and_stock_tiled_decode(server):
    graph = hunyuan_video_workflow()
    assert node_of(graph, "XditTestFluxConditioning") and node_of(graph, "FluxGuidance") and node_of(graph, "VAEDecodeTiled")
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    video = entry["outputs"][next(k for k, n in graph.items() if n["class_type"] == "SaveAnimatedWEBP")]["images"][0]
    assert Image.open(server.base / "output" / video.get("subfolder", "") / video["filename"]).size == (80, 48)
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "hunyuan_video"


def test_hunyuan_video_ring_workers_give_the_video_latents_of_one(server):
    def latent_graph(devices: str, **loader) -> dict:
        graph = hunyuan_video_workflow(**loader)
        node_of(graph, "ParallelLoader")["inputs"]["devices"] = devices
        node_of(graph, "ParallelSampler")["inputs"]["seed"] = 17
        sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
        for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "VAEDecodeTiled", "SaveAnimatedWEBP")]:
            del graph[node_id]
        graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"hv_{devices}"}}
        return graph

    # Two workers as Ring this time (the shipped workflow's Ulysses ran above).
    two = server.run(latent_graph("cpu,cpu", ulysses_degree=1, ring_degree=2))
    one = server.run(latent_graph("cpu"))
    assert status_str(two) == status_str(one) == "success", error_message(two) + error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert a.shape == (1, 16, 3, 6, 10)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


# --- DiT-XL-2 class-to-image and CogVideoX text-to-video (diffusers folders) ----------------------


def test_the_loader_lists_the_weights_files_inside_diffusers_folders(server):
    options = str(server.get("/object_info/ParallelLoader")["ParallelLoader"]["input"]["required"]["model_name"])
    assert DIT_NAME in options and COGVIDEOX_NAME in options


def dit_workflow() -> dict:
    graph = with_demo_conditioning(load_workflow("dit_class2img_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name=DIT_NAME, devices="cpu,cpu")
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)  # latent [1, 4, 8, 8]: the tiny DiT's sample size
        elif cls == "VAELoader":
            node["inputs"]["vae_name"] = "tiny_sd_vae.safetensors"
    return graph


def test_dit_class_to_image_workflow_runs_with_cfg_parallel_and_stock_vae_decode(server):
    graph = dit_workflow()
    assert node_of(graph, "ParallelClassLabel") and node_of(graph, "VAEDecode")
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    image = entry["outputs"][next(k for k, n in graph.items() if n["class_type"] == "SaveImage")]["images"]
    assert Image.open(server.base / "output" / image[0].get("subfolder", "") / image[0]["filename"]).size == (64, 64)
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "dit"


def test_the_folder_vae_decode_refuses_a_model_without_a_video_vae_folder(server):
    graph = dit_workflow()  # the DiT pool above stays: the loader reloads nothing and no sampling runs
    loader_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelLoader")
    latent_id = next(k for k, n in graph.items() if n["class_type"] == "EmptyLatentImage")
    graph = {loader_id: graph[loader_id], latent_id: graph[latent_id],
             "90": {"class_type": "ParallelFolderVAEDecode", "inputs": {"samples": [latent_id, 0], "model": [loader_id, 0], "tiled": True}},
             "91": {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": "refused"}}}
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "for DiT-XL-2" in error_message(entry) and "use the stock VAE Decode" in error_message(entry)


def cogvideox_workflow() -> dict:
    graph = with_demo_conditioning(load_workflow("cogvideox_txt2video_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name=COGVIDEOX_NAME, devices="cpu,cpu")
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "EmptyHunyuanLatentVideo":
            node["inputs"].update(width=80, height=48, length=9)  # latent [1, 16, 3, 6, 10]
    return graph


def test_cogvideox_workflow_runs_with_cfg_parallel_and_decodes_with_the_folder_vae(server):
    graph = cogvideox_workflow()
    assert node_of(graph, "ParallelFolderVAEDecode")
    decode_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelFolderVAEDecode")
    graph["91"] = {"class_type": "SaveImage", "inputs": {"images": [decode_id, 0], "filename_prefix": "cogvideox_frames"}}
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    video = entry["outputs"][next(k for k, n in graph.items() if n["class_type"] == "SaveAnimatedWEBP")]["images"][0]
    assert Image.open(server.base / "output" / video.get("subfolder", "") / video["filename"]).size == (80, 48)
    assert len(entry["outputs"]["91"]["images"]) == 9  # 3 latent frames: 1 + 2 x 4 video frames
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "cogvideox"


# --- ConsisID identity-preserving text-to-video (diffusers folder + identity file) ----------------


def consisid_workflow() -> dict:
    graph = with_demo_conditioning(load_workflow("consisid_txt2video_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name=CONSISID_NAME, devices="cpu,cpu")
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "ParallelConsisIDIdentity":
            node["inputs"].update(width=80, height=48, length=9)  # latent [1, 16, 3, 6, 10]
    return graph


def test_consisid_workflow_runs_with_cfg_parallel_and_decodes_with_the_folder_vae(server):
    graph = consisid_workflow()
    assert node_of(graph, "ParallelConsisIDIdentity")["inputs"]["identity"] == "face.safetensors"
    assert node_of(graph, "LoadImage")["inputs"]["image"] == "face.png"
    decode_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelFolderVAEDecode")
    graph["91"] = {"class_type": "SaveImage", "inputs": {"images": [decode_id, 0], "filename_prefix": "consisid_frames"}}
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    video = entry["outputs"][next(k for k, n in graph.items() if n["class_type"] == "SaveAnimatedWEBP")]["images"][0]
    assert Image.open(server.base / "output" / video.get("subfolder", "") / video["filename"]).size == (80, 48)
    assert len(entry["outputs"]["91"]["images"]) == 9  # 3 latent frames: 1 + 2 x 4 video frames
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "consisid"


def test_consisid_without_the_identity_node_is_refused_by_name(server):
    graph = consisid_workflow()
    identity_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelConsisIDIdentity")
    sampler = node_of(graph, "ParallelSampler")
    sampler["inputs"].update(positive=graph[identity_id]["inputs"]["positive"], negative=graph[identity_id]["inputs"]["negative"])
    entry = server.run(graph)
    assert status_str(entry) == "error"
    assert "connect the Parallel ConsisID Identity node's positive output" in error_message(entry)


# --- Latte text-to-video (diffusers folder) ------------------------------------------------------

def test_latte_workflow_runs_on_ulysses_and_decodes_the_frames_with_the_folder_vae(server):
    graph = with_demo_conditioning(load_workflow("latte_txt2video_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            # Ulysses over the spatial tokens of each frame (the shipped workflow's CFG parallel is cfg x 2 too)
            node["inputs"].update(model_name=LATTE_NAME, devices="cpu,cpu", use_cfg_parallel=False)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "EmptyHunyuanLatentVideo":
            node["inputs"].update(width=80, height=48, length=9)  # latent [1, 16 -> 4, 3, 6, 10]: the tiny model's 3 frames
    decode_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelFolderVAEDecode")
    graph["91"] = {"class_type": "SaveImage", "inputs": {"images": [decode_id, 0], "filename_prefix": "latte_frames"}}
    entry = server.run(graph)
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    video = entry["outputs"][next(k for k, n in graph.items() if n["class_type"] == "SaveAnimatedWEBP")]["images"][0]
    assert Image.open(server.base / "output" / video.get("subfolder", "") / video["filename"]).size == (80, 48)
    assert len(entry["outputs"]["91"]["images"]) == 3  # one video frame per latent frame
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "latte"

# --- Mochi 1 preview text-to-video ----------------------------------------------------------------


def mochi_latent_workflow(devices: str, padded_tokens: int = 256, **loader) -> dict:
    """The shipped Mochi workflow up to the sampler, its latent saved.

    ComfyUI builds the Mochi VAE at its released size whatever the file holds (its weights start
    uninitialised, so a partial file decodes garbage) and no small stock video VAE takes a 12-channel,
    6x-frame latent, so the stock decode is the one node this run leaves out (about 0.9 GB of weights).
    """
    graph = with_demo_conditioning(load_workflow("mochi_txt2video_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="tiny_mochi.safetensors", devices=devices, **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=3, seed=19)
        elif cls == "EmptyMochiLatentVideo":
            node["inputs"].update(width=80, height=48, length=13)  # latent [1, 12, 3, 6, 10]: 45 video tokens
        elif cls == "XditTestMochiConditioning":
            node["inputs"]["padded_tokens"] = padded_tokens
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
    for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "VAEDecode", "SaveAnimatedWEBP")]:
        del graph[node_id]
    graph["90"] = {"class_type": "SaveLatent",
                   "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"mochi_{devices}_{padded_tokens}"}}
    return graph


def test_mochi_workflow_on_ulysses_gives_the_latents_of_one_worker_and_crops_the_t5_padding(server):
    shipped = load_workflow("mochi_txt2video_parallel")
    assert node_of(shipped, "CLIPLoader")["inputs"]["type"] == "mochi"
    assert node_of(shipped, "ParallelSampler")["inputs"]["cfg"] == 4.5
    sampler_id = next(k for k, n in shipped.items() if n["class_type"] == "ParallelSampler")
    assert node_of(shipped, "VAEDecode")["inputs"]["samples"] == [sampler_id, 0] and node_of(shipped, "SaveAnimatedWEBP")
    # Positive and negative as stock T5 gives them: 256 tokens, the prompt's first, a mask over the rest.
    graph = mochi_latent_workflow("cpu,cpu", use_cfg_parallel=False, ulysses_degree=2)
    assert node_of(graph, "XditTestMochiConditioning")["inputs"]["padded_tokens"] == 256
    two = server.run(graph)
    assert status_str(two) == "success", error_message(two) + server.log()[-2000:]
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "mochi"
    one = server.run(mochi_latent_workflow("cpu", use_cfg_parallel=False))
    # The same prompts without padding or masked tokens: the reader must have cropped the padding away.
    unpadded = server.run(mochi_latent_workflow("cpu", padded_tokens=0, use_cfg_parallel=False))
    assert status_str(one) == status_str(unpadded) == "success", error_message(one) + error_message(unpadded)
    a, b, c = saved_latent(server, two), saved_latent(server, one), saved_latent(server, unpadded)
    assert a.shape == (1, 12, 3, 6, 10) and b.abs().max() > 0.1
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4
    assert float((c - b).abs().max() / b.abs().max()) < 1e-6


# --- HunyuanDiT text-to-image ----------------------------------------------------------------------


def hunyuan_dit_latent_workflow(devices: str, **loader) -> dict:
    """The shipped HunyuanDiT workflow up to the sampler, its latent saved (its VAE comes from the real checkpoint)."""
    graph = with_demo_conditioning(load_workflow("hunyuan_dit_txt2img_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="checkpoints/tiny_hunyuan_dit.safetensors", devices=devices, **loader)
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=3, seed=17)
        elif cls == "EmptyLatentImage":
            node["inputs"].update(width=96, height=80)
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
    for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAEDecode", "SaveImage")]:
        del graph[node_id]
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"hunyuan_dit_{devices}"}}
    return graph


def test_hunyuan_dit_workflow_with_cfg_parallel_gives_the_latents_of_one_worker(server):
    shipped = load_workflow("hunyuan_dit_txt2img_parallel")
    assert shipped["9"]["class_type"] == "VAEDecode" and shipped["1"]["class_type"] == "CheckpointLoaderSimple"
    graph = hunyuan_dit_latent_workflow("cpu,cpu")
    assert node_of(graph, "XditTestHunyuanDiTConditioning")
    assert all(node["class_type"] != "CheckpointLoaderSimple" for node in graph.values())
    two = server.run(graph)
    assert status_str(two) == "success", error_message(two) + server.log()[-2000:]
    pool = pool_status(server)
    assert len(pool["workers"]) == 2 and pool["model"]["family"] == "hunyuan_dit"
    one = server.run(hunyuan_dit_latent_workflow("cpu", use_cfg_parallel=False))
    assert status_str(one) == "success", error_message(one)
    a, b = saved_latent(server, two), saved_latent(server, one)
    assert a.shape == (1, 4, 10, 12) and b.abs().max() > 0.1
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4
