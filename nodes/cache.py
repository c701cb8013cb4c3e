"""The step-cache settings node: policy, threshold and step window → an optional input of the sampler."""
from __future__ import annotations

from comfy_api.latest import io

from ..easyanimate_core.cache import DEFAULT_END, DEFAULT_START, DEFAULT_THRESHOLDS, POLICIES, CacheSettings
from .conditioning import CATEGORY, check_choice

CacheType = io.Custom("EASYANIMATE_CACHE")


class CacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateCache",
            display_name="EasyAnimate Cache",
            category=CATEGORY,
            description="Step caching for the EasyAnimate Sampler: transformer passes whose result would barely "
                        "change are skipped and the last computed change is reused. Faster, at a small, "
                        "threshold-controlled quality cost; threshold 0 gives exactly the uncached video.",
            inputs=[
                io.Combo.Input("policy", options=list(POLICIES), default="auto",
                               tooltip="auto: needs no calibration (estimates the output change from the input "
                                       "change). teacache: per-model polynomial; needs the model folder's "
                                       "step_cache.json from `python -m easyanimate_core calibrate-cache`."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLDS["auto"], min=0.0, max=5.0, step=0.01,
                               round=0.001,
                               tooltip="How much estimated change may accumulate before a pass is computed again. "
                                       "Higher = more skipped, faster, further from the uncached video; "
                                       "0 = never skip."),
                io.Float.Input("start", default=DEFAULT_START, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps before which nothing is skipped (the first steps "
                                       "lay out the composition)."),
                io.Float.Input("end", default=DEFAULT_END, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps from which nothing is skipped (the last steps "
                                       "render the detail). Must be greater than start."),
            ],
            outputs=[CacheType.Output("cache", tooltip="Connect to the cache input of EasyAnimate Sampler.")],
        )

    @classmethod
    def execute(cls, policy: str, threshold: float, start: float, end: float) -> io.NodeOutput:
        check_choice("policy", policy, POLICIES)
        return io.NodeOutput(CacheSettings(policy, float(threshold), float(start), float(end)))
