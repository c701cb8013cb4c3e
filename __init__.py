"""EasyAnimate V5 for ComfyUI: the node pack's entry point (the model code lives in easyanimate_core/)."""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
