"""The pack's one HTTP route: GET /comfy_xdit/status, the worker pool's state as JSON.

Status only: it takes no parameters, reads no files and returns no paths.
"""

from __future__ import annotations

_registered = False


def register_routes() -> None:
    global _registered
    if _registered:
        return
    from aiohttp import web
    from server import PromptServer

    from .comfy_xdit import bridge

    @PromptServer.instance.routes.get("/comfy_xdit/status")
    async def comfy_xdit_status(request):
        return web.json_response(bridge.status())

    _registered = True
