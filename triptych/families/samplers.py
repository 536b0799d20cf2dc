"""Samplers by the names people know them, each a diffusers scheduler class and config overrides.

A request names a sampler (``--scheduler euler_a``); the denoiser swaps its pipeline's scheduler
for that class built from the checkpoint's own scheduler config (``Cls.from_config(config,
**overrides)``), exactly as one does with diffusers. Unset, the checkpoint's scheduler runs. Each
family lists the names its pipeline can run: the noise-prediction samplers for UNet-style
families, the flow-matching ones for flow DiTs (whose pipelines pass their own sigmas and shift).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # a diffusers scheduler class name
    overrides: dict[str, Any] = field(default_factory=dict)  # from_config keyword arguments

    def build(self, config: Any) -> Any:
        import diffusers

        return getattr(diffusers, self.scheduler).from_config(config, **self.overrides)


SAMPLERS: dict[str, Sampler] = {
    # noise-prediction (UNet-style) samplers
    "ddim": Sampler("DDIMScheduler"),
    "pndm": Sampler("PNDMScheduler"),
    "euler": Sampler("EulerDiscreteScheduler"),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler"),
    "heun": Sampler("HeunDiscreteScheduler"),
    "lms": Sampler("LMSDiscreteScheduler"),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": Sampler(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
    ),
    "dpmpp_2m_sde_karras": Sampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": Sampler("UniPCMultistepScheduler"),
    # flow-matching samplers
    "flow_euler": Sampler("FlowMatchEulerDiscreteScheduler"),
    "flow_euler_karras": Sampler("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "flow_euler_exponential": Sampler("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    "flow_heun": Sampler("FlowMatchHeunDiscreteScheduler"),  # takes no custom sigmas: SD3 only
}

NOISE_SAMPLERS = ("ddim", "pndm", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras",
                  "dpmpp_2m_sde_karras", "unipc")  # fmt: skip
FLOW_SAMPLERS = ("flow_euler", "flow_euler_karras", "flow_euler_exponential")
