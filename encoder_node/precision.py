"""What the encoder's text encoders compute in on a CPU: ``--dtype auto`` and ``--quantize int8``.

``--dtype auto`` on a CPU reads each text encoder's size from its config (the model is built on the
meta device: no weights are read) and picks, per encoder:

- bfloat16 for an encoder of at least :data:`BFLOAT16_MIN_PARAMETERS` parameters (T5-XXL, Gemma-2,
  Qwen, Mistral) on a CPU that computes bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` among the
  ``/proc/cpuinfo`` flags): half the memory, and matrix products on the CPU's bfloat16 units;
- float32 otherwise: the CLIPs (123M and 695M parameters) whatever the CPU, and every encoder on a CPU
  that would only emulate bfloat16.

An explicit ``--dtype`` is used as given for every component, as before.

``--quantize int8`` replaces the linear layers of the T5 and LLM text encoders (every one whose class
is not a CLIP) with PyTorch's dynamically quantized int8 layers: int8 weights (one scale per output
channel), activations quantized per call, float32 everywhere else. The CLIPs are left as they are.
T5's feed-forward output projections (``DenseReluDense.wo``) are not quantized: their input, a gated
GELU's product, has the heaviest tails of the network, and one int8 scale for all of it costs the most
precision (transformers keeps the same layers in float32 when T5 runs in float16). They stay bfloat16
(T5's forward casts their input to their dtype), half their float32 memory. On a random-weight T5-XXL of 8 layers, 512 tokens,
this took each token's cosine to float32 from 0.986 to 0.998 at worst (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

BFLOAT16_MIN_PARAMETERS = 1_000_000_000  # below this an encoder stays float32 under --dtype auto
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo); empty where there is none."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(flags: Iterable[str]) -> str | None:
    """The flag that says this CPU computes bfloat16 natively, or None."""
    found = set(flags)
    return next((flag for flag in BFLOAT16_CPU_FLAGS if flag in found), None)


def auto_dtype(parameters: int, device: str, flags: Iterable[str]) -> torch.dtype:
    """``--dtype auto`` for one text encoder of ``parameters`` parameters on ``device``."""
    if device == "cpu" and parameters >= BFLOAT16_MIN_PARAMETERS and native_bfloat16(flags):
        return torch.bfloat16
    return torch.float32


def is_quantizable(class_name: str) -> bool:
    """``--quantize int8`` applies to T5 and LLM text encoders, not to the CLIPs."""
    return not class_name.startswith("CLIP")


def text_encoders(model_index: Mapping[str, Any], keep: Iterable[str]) -> dict[str, str]:
    """The text encoders among the components the encoder loads: {component: transformers class}."""
    found = {}
    for name in keep:
        entry = model_index.get(name)
        if name.startswith("text_encoder") and isinstance(entry, list | tuple) and entry[0] is not None:
            found[name] = str(entry[1])
    return found


def parameter_count(model: str, component: str, class_name: str) -> int | None:
    """Parameters of a text encoder, from its config alone (built on the meta device); None if unknown."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model, subfolder=component)
        with torch.device("meta"):
            module = getattr(transformers, class_name)._from_config(config)
        return sum(p.numel() for p in module.parameters())
    except Exception as exc:  # an unusual checkpoint: fall back to the exact choice
        logger.warning("%s: cannot size %s from its config (%s); it stays float32", model, component, exc)
        return None


def choose_dtypes(sizes: Mapping[str, int | None], device: str, flags: Iterable[str]) -> dict[str, torch.dtype]:
    """``--dtype auto``: each text encoder's dtype from its size; "default" (float32) for the rest."""
    flags = frozenset(flags)
    chosen: dict[str, torch.dtype] = {"default": torch.float32}
    for name, parameters in sizes.items():
        chosen[name] = auto_dtype(parameters or 0, device, flags)
    return chosen


def describe_choice(sizes: Mapping[str, int | None], chosen: Mapping[str, torch.dtype], flags: Iterable[str]) -> str:
    """One log line: what each encoder got, and why."""
    native = native_bfloat16(flags)
    parts = []
    for name, parameters in sizes.items():
        dtype = str(chosen[name]).removeprefix("torch.")
        size = "size unknown" if parameters is None else f"{parameters / 1e6:.0f}M parameters"
        parts.append(f"{name} {dtype} ({size})")
    why = f"native bfloat16 ({native})" if native else "no native bfloat16 (no avx512_bf16 / amx_bf16 flag)"
    return (
        f"--dtype auto: {', '.join(parts)}; this CPU has {why}; "
        f"bfloat16 from {BFLOAT16_MIN_PARAMETERS / 1e9:.0f}B parameters"
    )


# T5's feed-forward output projections stay bfloat16 linears: T5's own forward casts their input to
# their weights' dtype (as it does for the float32 copies transformers keeps under float16).
KEEP_UNQUANTIZED = ("DenseReluDense.wo",)


def quantize_int8(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``module`` with a dynamically quantized int8 one, in place, one layer
    at a time (only one layer is ever held in float32 besides the rest), then make the other weights
    float32, as those layers' inputs must be. The layers named by :data:`KEEP_UNQUANTIZED` stay linear
    layers, in bfloat16. Returns the number of layers quantized."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    # Names only: holding the layers themselves would keep every replaced one alive, in float32.
    linears = [name for name, child in module.named_modules() if type(child) is torch.nn.Linear]
    kept = {name for name in linears if name.endswith(KEEP_UNQUANTIZED)}
    targets = [name for name in linears if name not in kept]
    for name in kept:
        module.get_submodule(name).to(torch.bfloat16)
    with warnings.catch_warnings():
        # torch marks its quantized tensor types deprecated (for torchao); the kernels are still its own.
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated", category=UserWarning)
        for name in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            linear = getattr(parent, attr).float()
            linear.qconfig = per_channel_dynamic_qconfig
            setattr(parent, attr, DynamicLinear.from_float(linear))
            del linear  # the float32 copy goes now, before the next layer's is made
    # Embeddings and norms in float32: the quantized layers take and give float32.
    for name, child in module.named_modules():
        if name not in kept:
            for param in child.parameters(recurse=False):
                param.data = param.data.float()
            for key, buffer in child.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    setattr(child, key, buffer.float())
    return len(targets)
