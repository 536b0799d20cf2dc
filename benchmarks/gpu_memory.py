"""GPU memory and speed: triptych's denoiser node against diffusers on one GPU.

For each model, a pipeline of the published architecture is built with random weights (the
configs are in published.py; nothing is downloaded) directly on the GPU in its usual dtype, then
measured three ways in one run:

  (a) triptych's denoiser node: the pipeline written to a checkpoint folder holding only what
      a denoiser node reads (model_index.json, the family's denoiser components, the VAE's
      config), loaded by the node's own loader (``load_stage``: the UNet/transformer and the
      scheduler on the GPU, nothing else) and run through the family's ``denoise`` on
      precomputed embeddings, as the node runs it. Peak ``torch.cuda.max_memory_allocated``
      and seconds per image: the GPU's time per image, since the encoder and decoder nodes
      run elsewhere, on other requests meanwhile. The floor it is held to: the denoiser's
      weight bytes plus the activations of one forward pass of the denoiser, replayed alone
      on the inputs of the pipeline's first step.
  (b) diffusers with every component on the GPU: peak memory and seconds per image
      (text encoding, denoising and VAE decoding of one image).
  (c) diffusers with ``enable_model_cpu_offload()``: seconds per image.

Ratios printed, with their targets: (a) peak / (weights + one step's activations) <= 1.15;
(a) s/image / (b) s/image <= 1.03; (c) s/image / (a) s/image >= 3. (a) needs a triptych
family for the pipeline; without one, the output says so and only (b) and (c) are measured.

At full size the GPU must hold all of FLUX.1-dev (a 34 GiB peak in (b)); the run takes about
36 GB of RAM, 24 GB of disk for FLUX's denoiser checkpoint (``--workdir`` puts it elsewhere than
the temp folder) and about 4 minutes on an H100.

    python benchmarks/gpu_memory.py --json meter.json                  # all models, CUDA
    python benchmarks/gpu_memory.py --models pixart,sdxl --steps 20
    python benchmarks/gpu_memory.py --tiny                           # tiny configs; CPU works
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import describe, machine, table, verdict, write_json
from published import PROMPT, SPECS, family_of

from protocol.messages import RequestSpec

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # notices about optional packages
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # e.g. clean_caption needing Beautiful Soup
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # saving and loading checkpoints

GiB = 2**30
TARGET_MEMORY = 1.15  # (a) peak <= this x (weights + one step's activations)
TARGET_SPEED = 1.03  # (a) s/image <= this x (b) s/image
TARGET_OFFLOAD = 3.0  # (c) s/image >= this x (a) s/image


# --- triptych's denoiser stage -------------------------------------------------------------


def save_denoiser_checkpoint(pipe: Any, family: Any, folder: Path) -> Path:
    """A checkpoint folder holding what a denoiser node reads: model_index.json, the family's
    denoiser components and the VAE's config.json (for the latent scale), nothing else."""
    from protocol.stages import DENOISER

    pipe.save_config(folder)
    for name in family.components[DENOISER]:
        getattr(pipe, name).save_pretrained(folder / name)
    pipe.vae.save_config(folder / "vae")
    return folder


# --- measuring ------------------------------------------------------------------------------


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Meter:
    """Synchronised timing and peak-memory readings; on a CPU, timings only."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def per_image(self, run: Callable[[int], Any], images: int, warmup: int) -> tuple[float, int | None]:
        """(seconds per image, peak bytes) over ``images`` calls after ``warmup`` untimed ones."""
        for i in range(warmup):
            run(1000 + i)
        self.reset()
        start = time.perf_counter()
        for i in range(images):
            run(i)
        self.sync()
        return (time.perf_counter() - start) / images, self.peak()


class FirstCall:
    """Keeps a copy of the inputs of a module's first forward call, then unhooks itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.captured = False
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # Kept on the CPU, so the copy takes no GPU memory while the timed runs measure their peak.
        self.args, self.kwargs = _moved(args, "cpu"), _moved(kwargs, "cpu")
        self.captured = True
        self._handle.remove()

    def inputs(self, device: str) -> tuple[tuple, dict]:
        if not self.captured:
            raise RuntimeError("the denoiser was never called")
        return _moved(self.args, device), _moved(self.kwargs, device)


def _moved(value: Any, device: str) -> Any:
    """A copy of tensors (also inside dicts, lists and tuples) on ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_moved(v, device) for v in value)
    return value


def measure(key: str, args: argparse.Namespace, device: str) -> dict:
    spec = SPECS[key]
    meter = Meter(device)
    dtype = spec.dtype if meter.cuda else torch.float32  # half precision on a CPU is slow and partial
    steps = args.steps or (2 if args.tiny else spec.steps)
    size = spec.tiny_size if args.tiny else spec.size
    images, warmup = args.images, args.warmup
    result: dict[str, Any] = {"model": spec.name, "dtype": str(dtype).removeprefix("torch."), "steps": steps}
    result["size"] = f"{size}x{size}"

    meter.reset()
    start = time.perf_counter()
    pipe = spec.build(args.tiny, device, dtype)
    pipe.to(device, dtype)  # buffers some modules create in float32
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # built modules start in training mode (dropout); loaded ones do not
    pipe.set_progress_bar_config(disable=True)
    meter.sync()
    result["build_s"] = time.perf_counter() - start
    result["pipeline"] = type(pipe).__name__
    family = family_of(pipe)
    result["family"] = family.name if family is not None else None
    result["weights_gib"] = {
        name: weight_bytes(module) / GiB
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
    # Unset options take the pipeline's defaults, on both sides (guidance, sequence length...).
    request = RequestSpec(model=key, prompt=PROMPT, steps=steps, height=size, width=size, seed=0)
    call = {"num_inference_steps": steps, "height": size, "width": size}

    with torch.inference_mode(), tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        embeds = None
        if family is not None:
            # What the encoder node sends: computed here on the GPU, moved to the CPU like the wire.
            embeds = {name: t.cpu() for name, t in family.encode(pipe, request).items()}
            result["embeddings"] = {name: list(t.shape) for name, t in embeds.items()}

        # (b) diffusers, every component on the GPU
        def whole(seed: int) -> Any:
            return pipe(PROMPT, **call, generator=torch.Generator("cpu").manual_seed(seed)).images

        result["all_on_gpu_s"], peak = meter.per_image(whole, images, warmup)
        result["all_on_gpu_peak_gib"] = None if peak is None else peak / GiB

        # (c) diffusers with model CPU offload (accelerate moves each model to the GPU when it runs)
        result["offload_s"] = result["offload_peak_gib"] = None
        if meter.cuda and not args.skip_offload:
            pipe.enable_model_cpu_offload()
            result["offload_s"], peak = meter.per_image(whole, args.offload_images, warmup)
            result["offload_peak_gib"] = peak / GiB
            pipe.remove_all_hooks()
        pipe.to("cpu")

        if family is not None:
            folder = save_denoiser_checkpoint(pipe, family, Path(workdir) / key)
            pipe = None
            result.update(measure_denoiser(meter, folder, device, dtype, embeds, request, images, warmup))
    pipe = embeds = None
    meter.reset()
    result.update(ratios(result))
    return result


def measure_denoiser(
    meter: Meter,
    folder: Path,
    device: str,
    dtype: torch.dtype,
    embeds: dict,
    request: RequestSpec,
    images: int,
    warmup: int,
) -> dict[str, Any]:
    """(a): the stage loaded by the denoiser node's own loader, denoising through its family."""
    from protocol.stages import DENOISER
    from triptych.families.loading import load_stage

    result: dict[str, Any] = {}
    meter.reset()
    result["resident_before_gib"] = meter.allocated() / GiB if meter.cuda else None
    stage = load_stage(str(folder), DENOISER, device=device, dtype=dtype)
    family, pipe = stage.family, stage.pipe
    denoiser = getattr(pipe, family.denoiser_attr)
    result["denoiser_weights_gib"] = weight_bytes(denoiser) / GiB
    first = FirstCall(denoiser)

    def denoise(seed: int) -> Any:
        return family.denoise(pipe, [(embeds, dataclasses.replace(request, seed=seed))], lambda step, total: None)

    result["triptych_s"], peak = meter.per_image(denoise, images, max(warmup, 1))
    result["triptych_peak_gib"] = None if peak is None else peak / GiB

    # One step: the denoiser's forward pass alone, on the inputs of the pipeline's first step.
    inputs, kwargs = first.inputs(device)
    meter.reset()
    before = meter.allocated()
    denoiser(*inputs, **kwargs)
    meter.sync()
    if meter.cuda:
        result["one_step_activations_gib"] = (meter.peak() - before) / GiB
        result["floor_gib"] = result["denoiser_weights_gib"] + result["one_step_activations_gib"]
    return result


def ratios(r: dict) -> dict[str, Any]:
    values = {"peak_over_floor": None, "triptych_over_all_on_gpu_s": None, "offload_over_triptych_s": None}
    if r.get("triptych_s") is not None:
        values["triptych_over_all_on_gpu_s"] = r["triptych_s"] / r["all_on_gpu_s"]
        if r.get("floor_gib"):
            values["peak_over_floor"] = r["triptych_peak_gib"] / r["floor_gib"]
        if r.get("offload_s") is not None:
            values["offload_over_triptych_s"] = r["offload_s"] / r["triptych_s"]
    met = {
        "peak_over_floor": lambda v: v <= TARGET_MEMORY,
        "triptych_over_all_on_gpu_s": lambda v: v <= TARGET_SPEED,
        "offload_over_triptych_s": lambda v: v >= TARGET_OFFLOAD,
    }
    return {
        "ratios": values,
        "targets_met": {name: None if v is None else met[name](v) for name, v in values.items()},
    }


def report(key: str, r: dict) -> None:
    def gib(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    family = r["family"] or f"none: triptych has no family for {r['pipeline']}, so (a) is not measured"
    print(f"\n== {r['model']} ({key}): {r['size']}, {r['steps']} steps, {r['dtype']}; triptych family: {family}")
    weights = ", ".join(f"{name} {size:.2f}" for name, size in r["weights_gib"].items())
    print(f"weights GiB: {weights}; built in {r['build_s']:.1f}s")
    print(
        table(
            ["setup", "peak GiB", "s/image"],
            [
                ["(a) triptych denoiser node (denoise only)", gib(r.get("triptych_peak_gib")), r.get("triptych_s")],
                ["    floor: denoiser weights + one step's activations", gib(r.get("floor_gib")), None],
                ["(b) diffusers, all on GPU (encode+denoise+decode)", gib(r["all_on_gpu_peak_gib"]), r["all_on_gpu_s"]],
                ["(c) diffusers, enable_model_cpu_offload", gib(r["offload_peak_gib"]), r["offload_s"]],
            ],
        )
    )
    if r.get("triptych_s") is not None:
        print(
            f"GPU memory in use before the denoiser stage loaded {gib(r['resident_before_gib'])} GiB; "
            f"denoiser weights {gib(r['denoiser_weights_gib'])} GiB; "
            f"one step's activations {gib(r.get('one_step_activations_gib'))} GiB"
        )
    ratios, met = r["ratios"], r["targets_met"]
    lines = [
        ("peak_over_floor", "(a) peak / (weights + one step)", f"<= {TARGET_MEMORY}"),
        ("triptych_over_all_on_gpu_s", "(a) s/image / (b) s/image", f"<= {TARGET_SPEED}"),
        ("offload_over_triptych_s", "(c) s/image / (a) s/image", f">= {TARGET_OFFLOAD:g}"),
    ]
    for name, label, target in lines:
        value = "n/a" if ratios[name] is None else f"{ratios[name]:.3f}"
        print(f"result: {key} {label} = {value} (target {target}: {verdict(met[name])})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="pixart,sdxl,flux", help="comma-separated: pixart, sdxl, flux (default all)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; 2 with --tiny)")
    parser.add_argument("--images", type=int, default=2, help="timed images per setup (default 2)")
    parser.add_argument("--offload-images", type=int, default=1, help="timed images with CPU offload (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first, per setup (default 1)")
    parser.add_argument("--skip-offload", action="store_true", help="leave out (c)")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument(
        "--workdir", help="where the denoiser's checkpoint is written for its loader (default: the temp folder)"
    )
    parser.add_argument("--tiny", "--smoke", action="store_true", help="miniature configs: a check that it runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    keys = [key.strip() for key in args.models.split(",") if key.strip()]
    unknown = [key for key in keys if key not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        # As the denoiser node does on CUDA by default; set for every setup alike.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        print("no CUDA: timings only, no memory figures and no CPU offload (the figures that matter need a GPU)")
        if args.tiny:
            torch.set_num_threads(1)  # miniature models are per-op overhead; a second thread only waits
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random weights give NaN pixels in fp16
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' deprecation notices
    info = machine()
    print(f"gpu_memory benchmark | {describe(info)} | device {device}")
    results = {}
    for key in keys:
        results[key] = measure(key, args, device)
        report(key, results[key])
    write_json(
        args.json,
        {"benchmark": "gpu_memory", "mode": "tiny" if args.tiny else "full", "machine": info, "models": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
