"""The ComfyUI extension: our node classes, registered through the schema API."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

import folder_paths

from ..example_inputs import copy_missing
from . import cache, conditioning, loaders, long_video, multi_gpu, native, routes, sampling, training, vae
from .comfy_bridge import log

loaders.register_model_folder()
routes.register()
try:  # the files the shipped workflows load, so each runs the moment it is dragged in
    copied = copy_missing(folder_paths.get_input_directory())
    if copied:
        log.info("EasyAnimate: copied the example inputs %s into %s", ", ".join(copied),
                 folder_paths.get_input_directory())
except OSError as exc:  # a read-only input folder must not stop the nodes from loading
    log.warning("EasyAnimate: could not copy the example inputs into ComfyUI's input folder: %s", exc)

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
    long_video.LongVideoSampler,
    training.TrainingDataset,
    training.TrainLora,
    *native.NODES,
    cache.CacheNode,
    multi_gpu.MultiGPULoader,
]


class EasyAnimateExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> EasyAnimateExtension:
    return EasyAnimateExtension()
