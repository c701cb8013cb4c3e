"""HTTP routes our web extension reads: which official models the loader lists but are not downloaded yet."""
from __future__ import annotations

from aiohttp import web

from . import loaders

MODELS_ROUTE = "/easyanimate/models"


def register() -> None:
    """Add our routes to ComfyUI's server (before it starts serving, as custom nodes load)."""
    from server import PromptServer

    @PromptServer.instance.routes.get(MODELS_ROUTE)
    async def model_status(request):
        choices = loaders.model_choices()
        return web.json_response({"models": choices,
                                  "not_downloaded": [name for name in choices if loaders.not_downloaded(name)]})
