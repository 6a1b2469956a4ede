"""Security properties of the pack that need no ComfyUI server (issue 9).

The route table is read from the pack's source (every aiohttp registration form); the local
pool is started for real (two CPU workers) and its processes' listening sockets are listed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil
import pytest

from comfy_xdit.config import ParallelConfig
from comfy_xdit.pool import WorkerPool, protocol
from comfy_xdit.pool.loopback import local_rendezvous_environment

REPO_ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".comfyui", ".venv", "tests", ".git", "node_modules"}
ROUTE_FORMS = re.compile(r"routes\.(get|post|put|patch|delete|route|view|static)\(\s*[\"']([^\"']*)|"
                         r"add_(?:route|get|post|put|patch|delete|static|view)\(")
LOOPBACK = {"127.0.0.1", "::1"}

pytestmark = pytest.mark.timeout(180)


def pack_sources():
    for path in REPO_ROOT.rglob("*.py"):
        if not SKIP_DIRS.intersection(path.relative_to(REPO_ROOT).parts):
            yield path


def test_the_pack_registers_one_route_and_it_takes_no_path():
    routes = [(path.relative_to(REPO_ROOT).as_posix(), match.group(0))
              for path in pack_sources() for match in ROUTE_FORMS.finditer(path.read_text())]
    assert routes == [("status_routes.py", 'routes.get("/comfy_xdit/status')], routes
    handler = (REPO_ROOT / "status_routes.py").read_text()
    # The handler reads nothing from the request (no query, match_info, body or file).
    assert not re.search(r"request\.(query|match_info|post|json|read|text|multipart|rel_url)", handler)
    assert "open(" not in handler


def listening_addresses(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_a_local_pool_listens_on_loopback_only(tmp_path):
    with WorkerPool(ParallelConfig(ulysses_degree=2, devices=("cpu", "cpu")), log_dir=tmp_path) as pool:
        pool.start()
        workers = pool.status()["workers"]
        assert len(workers) == 2
        for worker in workers:
            addresses = listening_addresses(worker["pid"])
            assert addresses <= LOOPBACK, f"rank {worker['rank']} listens on {addresses}"
            environ = psutil.Process(worker["pid"]).environ()
            assert environ[protocol.ENV_STORE_FILE].startswith(str(tmp_path))  # FileStore, not a TCP store
            assert environ.get("GLOO_SOCKET_IFNAME") in ("lo", "lo0")
        assert listening_addresses(os.getpid()) <= LOOPBACK  # the host's control listener too


def test_a_users_interface_choice_wins_and_multinode_keeps_its_store(tmp_path):
    env = local_rendezvous_environment(tmp_path / "store", {"GLOO_SOCKET_IFNAME": "eth7"})
    assert "GLOO_SOCKET_IFNAME" not in env and env[protocol.ENV_STORE_FILE] == str(tmp_path / "store")
    pool = WorkerPool(ParallelConfig(ulysses_degree=2, devices=("cpu", "cpu")), log_dir=tmp_path)
    multinode = pool._worker_environment(0, "cpu", 29500, b"k", store="10.0.0.1:29400:p")
    assert protocol.ENV_STORE_FILE not in multinode and multinode[protocol.ENV_STORE] == "10.0.0.1:29400:p"


@pytest.mark.parametrize("name", ["../../etc/passwd", "../x.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                  "..\\x.safetensors", "C:\\models\\x.safetensors", "\\\\server\\share\\x.safetensors"])
def test_names_leaving_a_model_folder_are_refused_naming_the_folder(name):
    from comfy_xdit.file_names import FileNameError, check_file_name

    with pytest.raises(FileNameError, match=r"models/loras folder: names with '\.\.' or absolute paths are refused"):
        check_file_name("lora_name", "loras", name, [name])  # refused even if a listing held it


def test_a_listed_name_in_a_subfolder_is_accepted():
    from comfy_xdit.file_names import check_file_name

    assert check_file_name("lora_name", "loras", "flux/style.safetensors", ["flux/style.safetensors"]) == "flux/style.safetensors"


def test_errors_for_the_page_keep_file_names_and_drop_folders_and_secrets():
    from comfy_xdit.loading import CheckpointError
    from comfy_xdit.page_errors import clean_text, for_page

    environ = {"HF_TOKEN": "hf_live_abcdef123", "PATH": "/usr/bin", "SHORT_KEY": "abc"}
    text = ('/home/ann/ComfyUI/models/unet/flux1-dev.safetensors: header too large.\n'
            'last lines of /tmp/comfy_xdit_pool_x1/worker-1.run2.log:\n  File "/srv/venv/lib/torch/x.py", line 3\n'
            'C:\\Users\\ann\\models\\sd3.safetensors; token hf_live_abcdef123; see https://github.com/a/b; step 2/4')
    assert clean_text(text, environ) == (
        'flux1-dev.safetensors: header too large.\nlast lines of worker-1.run2.log:\n  File "x.py", line 3\n'
        'sd3.safetensors; token ***; see https://github.com/a/b; step 2/4')

    error = for_page(CheckpointError("/models/unet/bad.safetensors: truncated"))
    assert type(error) is CheckpointError and str(error) == "bad.safetensors: truncated"
    clean = ValueError("steps must be at least 1")
    assert for_page(clean) is clean  # nothing to hide: the very exception (an interrupt passes untouched)

    class PackError(RuntimeError):  # as ComfyUI imports a pack: its module named by its path
        pass

    PackError.__module__ = "/home/ann/ComfyUI/custom_nodes/comfy_xdit.comfy_xdit.pool.host"
    shown = for_page(PackError("rank 1 died"))
    assert isinstance(shown, PackError) and str(shown) == "rank 1 died"
    assert type(shown).__module__ == "comfy_xdit.comfy_xdit.pool.host" and type(shown).__qualname__.endswith("PackError")
