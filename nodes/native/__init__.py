"""EasyAnimate in ComfyUI's own sampling: a native MODEL, CONDITIONING and concat conditioning (see model.py)."""
from . import lora_keys
from .nodes import TextEncodeConditioning, ToComfyModel, VideoConditioningNode

lora_keys.install()

NODES = [ToComfyModel, TextEncodeConditioning, VideoConditioningNode]
