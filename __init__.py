"""EasyAnimate V5 for ComfyUI: the node pack's entry point (the model code lives in easyanimate_core/)."""
import importlib.util

WEB_DIRECTORY = "./web"

# Outside ComfyUI (pytest collecting this folder as a package, plain-Python use) there is nothing to register.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
