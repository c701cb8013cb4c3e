"""The five V5 samplers, each a diffusers scheduler built from the folder's scheduler_config.json."""
from __future__ import annotations

import inspect

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

from .errors import UnsupportedRequestError

SAMPLERS = {
    "DDIM": DDIMScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler A": EulerAncestralDiscreteScheduler,
    "DPM++": DPMSolverMultistepScheduler,
    "PNDM": PNDMScheduler,
}
SAMPLER_NAMES = tuple(SAMPLERS)
DEFAULT_SAMPLER = "DDIM"
# PNDM's Runge-Kutta warm-up needs 4 steps; diffusers fails below that with a numpy broadcast error.
MIN_STEPS = {"PNDM": 4}


def make_scheduler(name: str, scheduler_config: dict):
    """A fresh scheduler of the named kind from the model's (DDIM) config, as the original builds it.

    Keys a class does not know are ignored (so PNDM runs without zero-SNR rescaling, like the original).
    """
    if name not in SAMPLERS:
        raise UnsupportedRequestError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    cls = SAMPLERS[name]
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in accepted}
    return cls.from_config(config)


def check_steps(name: str, num_inference_steps: int) -> None:
    """Refuse a step count the sampler cannot run, with a message instead of a library traceback."""
    minimum = MIN_STEPS.get(name, 1)
    if int(num_inference_steps) < minimum:
        raise UnsupportedRequestError(
            f"the {name} sampler needs at least {minimum} steps (got {num_inference_steps}); "
            f"raise the step count or pick another sampler ({', '.join(n for n in SAMPLER_NAMES if n != name)}).")
