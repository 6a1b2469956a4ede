import os
import shutil
import tempfile
from pathlib import Path

import pytest


# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def remove_killed_hosts_pool_folders():
    """Tests that SIGKILL a pool's host (a ComfyUI server) leave its log folder behind, as a real
    crash would. Remove those of this session once their host is gone; leave everyone else's."""
    from comfy_xdit.pool.host import LOG_DIR_PREFIX, log_dir_owner
    from comfy_xdit.pool.shm import process_exists

    def pool_folders() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob(f"{LOG_DIR_PREFIX}*"))

    before = pool_folders()
    yield
    for folder in pool_folders() - before:
        owner = log_dir_owner(folder)
        if owner is not None and not process_exists(owner):
            shutil.rmtree(folder, ignore_errors=True)
