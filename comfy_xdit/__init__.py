"""comfy_xdit: xDiT's parallel DiT inference engine. A library; it never imports ComfyUI."""

__version__ = "0.1.0"
