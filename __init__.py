"""comfy_xdit as a ComfyUI custom-node pack: multi-GPU DiT sampling and VAE decode.

ComfyUI imports this file at start-up; it imports nothing heavy (the nodes load the engine on
first use) and starts no workers.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import XditExtension
    from .status_routes import register_routes

    # ComfyUI 0.3.75 never calls ComfyExtension.on_load; its routes table is still open here.
    register_routes()
    return XditExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
