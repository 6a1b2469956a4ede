"""A real ComfyUI started headless on loopback, as a separate process, for the demo and the tests.

The pack is linked into custom_nodes as a user's git clone would be, next to the demo-only
conditioning node; model files go into the server's own model folders. Nothing here imports
ComfyUI: it runs ComfyUI's main.py and talks to it over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the pack: this engine's parent folder
DEMO_NODES = Path(__file__).resolve().parent / "comfyui_demo_nodes"


def find_comfyui(explicit: str | None = None) -> Path:
    """The ComfyUI to run: the one named, $COMFYUI_PATH, or the pinned one tools/setup.sh installs."""
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), str(REPO / ".comfyui" / "ComfyUI")):
        if candidate and (Path(candidate) / "main.py").exists():
            return Path(candidate).resolve()
    raise FileNotFoundError(
        "no ComfyUI found: run tools/setup.sh (it installs the pinned test ComfyUI), set COMFYUI_PATH, "
        "or pass --comfyui PATH/TO/ComfyUI"
    )


COMFYUI = REPO / ".comfyui" / "ComfyUI"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, comfyui: Path | None = None):
        self.base = base
        self.comfyui = comfyui or find_comfyui()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        for folder in ("custom_nodes", "models/diffusion_models", "models/checkpoints", "models/loras", "models/vae", "output", "input"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        for name, target in (("comfy_xdit", REPO), ("xdit_demo_nodes", DEMO_NODES)):
            link = base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)

    def start(self, timeout_s: float = 120.0, cpu: bool = True, env: dict[str, str] | None = None) -> "ComfyServer":
        command = [
            sys.executable, str(self.comfyui / "main.py"), *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
        ]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(self.comfyui),
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer in {timeout_s} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP ------------------------------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
                return response.status, (json.loads(text) if text else {})
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def submit(self, graph: dict) -> str:
        status, answer = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {json.dumps(answer)[:3000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout_s: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout_s} s:\n{self.log()[-3000:]}")

    def run(self, graph: dict, timeout_s: float = 300.0) -> dict:
        return self.wait(self.submit(graph), timeout_s)


def status_str(entry: dict) -> str:
    return entry["status"]["status_str"]


def error_message(entry: dict) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


TEXT_ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeFlux", "CLIPTextEncodeSD3")
CLIP_LOADERS = ("DualCLIPLoader", "CLIPLoader", "TripleCLIPLoader")


def with_demo_conditioning(graph: dict, context_dim: int, pooled_dim: int) -> dict:
    """A shipped API workflow with its text encoders swapped for the demo conditioning node.

    The workflow's CLIP loader says which layout to emit: TripleCLIPLoader is SD3's, a CLIPLoader of
    type pixart PixArt's, of type wan Wan's (no pooled output), of type mochi Mochi's (padded, with a mask),
    a HunyuanDiT checkpoint's CLIP HunyuanDiT's (BERT tokens context_dim wide, mT5 tokens twice that),
    others Flux's.
    """
    graph = json.loads(json.dumps(graph))
    hunyuan_dit = any(node["class_type"] == "CheckpointLoaderSimple" and "hunyuan_dit" in node["inputs"].get("ckpt_name", "")
                      for node in graph.values())
    sd3 = any(node["class_type"] == "TripleCLIPLoader" for node in graph.values())
    clip_type = next((node["inputs"].get("type") for node in graph.values() if node["class_type"] == "CLIPLoader"), None)
    for node_id, node in list(graph.items()):
        if node["class_type"] in TEXT_ENCODERS:
            seed = int(node_id)
            inputs = {"seed": seed, "tokens": 7 + seed, "context_dim": context_dim, "pooled_dim": pooled_dim}
            if hunyuan_dit:
                graph[node_id] = {"class_type": "XditTestHunyuanDiTConditioning",
                                  "inputs": {"seed": seed, "padded": seed % 50, "context_dim": context_dim,
                                             "t5_dim": 2 * context_dim}}
            elif clip_type == "mochi":  # T5 tokens padded to 256 with an attention mask, as stock emits them
                graph[node_id] = {"class_type": "XditTestMochiConditioning",
                                  "inputs": {"seed": seed, "tokens": 7 + seed, "context_dim": context_dim, "padded_tokens": 256}}
            elif clip_type in ("pixart", "wan", "qwen_image"):  # T5 / umt5 / Qwen2.5-VL tokens only
                # Qwen-Image's layout is Wan's: tokens with pooled_output None.
                node_class = "XditTestPixArtConditioning" if clip_type == "pixart" else "XditTestWanConditioning"
                graph[node_id] = {"class_type": node_class,
                                  "inputs": {"seed": seed, "tokens": 7 + seed, "context_dim": context_dim}}
            elif sd3:
                graph[node_id] = {"class_type": "XditTestSD3Conditioning", "inputs": inputs}
            else:
                graph[node_id] = {"class_type": "XditTestFluxConditioning", "inputs": {**inputs, "guidance": 3.5}}
        elif node["class_type"] in CLIP_LOADERS or (hunyuan_dit and node["class_type"] == "CheckpointLoaderSimple"):
            del graph[node_id]
    return graph


def shipped_workflow(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
