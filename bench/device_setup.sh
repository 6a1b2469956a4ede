# Source this on a GPU machine without internet, from the repository root, before bench/run.py:
#     . bench/device_setup.sh && python3 bench/run.py --group flux-usp
# It installs the wheels carried in .whl/ (diffusers, yunchang, xfuser, distvae; fetched with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`) into /tmp/site, puts the
# repository on PYTHONPATH, keeps NVLink multicast off, and prints the versions a table needs.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
nvidia-smi topo -m 2>/dev/null | head -4
python3 - <<'EOF'
import importlib.metadata as md, torch
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpus", torch.cuda.device_count())
for name in ("diffusers", "yunchang", "xfuser", "distvae", "transformers", "accelerate", "huggingface-hub", "flash-attn", "triton"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
EOF
