"""The ComfyUI extension: our node classes, registered through the schema API."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import conditioning, loaders, multi_gpu, sampling, vae

loaders.register_model_folder()

NODES = [
    loaders.ModelLoader,
    loaders.LoraLoader,
    conditioning.TextEncode,
    conditioning.EmptyLatent,
    conditioning.ImageToVideo,
    conditioning.VideoInpaint,
    conditioning.ControlVideo,
    conditioning.ResolutionBucket,
    conditioning.CannyEdges,
    sampling.Sampler,
    vae.VAEDecode,
    vae.VAEEncode,
    multi_gpu.MultiGPULoader,
]


class EasyAnimateExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> EasyAnimateExtension:
    return EasyAnimateExtension()
