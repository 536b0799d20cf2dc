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

Then, for FLUX.1-dev and Qwen-Image (``--fit-models``), the denoiser alone in each setting of
``denoiser_node.fit`` (the node's flags ``--quantize int8wo | float8wo | nf4`` and ``--offload group``,
loaded by the node's own loader) beside the same denoiser in its dtype and beside diffusers'
``enable_model_cpu_offload()`` and ``enable_sequential_cpu_offload()`` on that denoiser's pipeline:
peak VRAM and seconds per image for each, and the estimate ``--max-vram`` chooses by. The
estimates for the published configs are printed on any machine (they need no weights).

Ratios printed, with their targets: (a) peak / (weights + one step's activations) <= 1.15;
(a) s/image / (b) s/image <= 1.03; (c) s/image / (a) s/image >= 3. (a) needs a triptych
family for the pipeline; without one, the output says so and only (b) and (c) are measured.

At full size the GPU must hold all of FLUX.1-dev (a 34 GiB peak in (b)); the run takes about
36 GB of RAM, 24 GB of disk for FLUX's denoiser checkpoint (``--workdir`` puts it elsewhere than
the temp folder) and about 4 minutes on an H100. The fit settings then take 24 GB and 41 GB of disk
in turn (FLUX.1-dev's and Qwen-Image's random-weight denoisers) and as much host RAM for the offloads;
their time is not measured yet.

    python benchmarks/gpu_memory.py --json meter.json                  # all models, CUDA
    python benchmarks/gpu_memory.py --models pixart,sdxl --steps 20
    python benchmarks/gpu_memory.py --tiny                           # tiny configs; CPU works
    python benchmarks/gpu_memory.py --models none --fit-models flux  # only the fit settings, FLUX.1-dev
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import describe, machine, table, verdict, write_json
from published import FLUX_DEV, PROMPT, SPECS, built_on, family_of

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


# --- the denoiser's fit settings (denoiser_node.fit) -----------------------------------------

# Qwen/Qwen-Image transformer/config.json: 60 double-stream blocks of width 3072 (20.4B parameters).
QWEN_IMAGE = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}


@dataclasses.dataclass(frozen=True)
class FitSpec:
    name: str
    tiny_family: str  # triptych.testing's tiny checkpoint: the model_index, scheduler and VAE config around it
    denoiser_class: str
    config: dict  # the published denoiser config
    tokens: int  # prompt length of the embeddings fed in (FLUX.1 pads to 512; Qwen-Image keeps the prompt's own)
    dtype: torch.dtype


FIT_SPECS = {
    "flux": FitSpec("FLUX.1-dev", "flux", "FluxTransformer2DModel", FLUX_DEV, 512, torch.bfloat16),
    "qwenimage": FitSpec("Qwen-Image", "qwenimage", "QwenImageTransformer2DModel", QWEN_IMAGE, 32, torch.bfloat16),
}
DIFFUSERS_OFFLOADS = ("model_cpu_offload", "sequential_cpu_offload")  # pipe.enable_<name>(), on the denoiser's pipe
FIT_SETTINGS = ("plain", "int8wo", "float8wo", "nf4", "group", *DIFFUSERS_OFFLOADS)
BUDGETS_GIB = (80, 48, 24, 16, 12, 8)  # --max-vram values whose choice is printed
# Where no GPU is at hand, the choices are printed for this one (its name says so).
ASSUMED_GPU = {"device": "cuda", "capability": (9, 0), "gpu_name": "an assumed CUDA GPU of compute capability 9.0"}


def fit_checkpoint(spec: FitSpec, tiny: bool, device: str, folder: Path) -> Path:
    """A denoiser checkpoint: the family's tiny checkpoint, its transformer replaced by the published
    architecture with random weights (built on ``device`` in the model's dtype) unless ``tiny``."""
    import diffusers

    from triptych.testing import build_tiny_checkpoint

    build_tiny_checkpoint(spec.tiny_family, folder)
    if tiny:
        return folder
    shutil.rmtree(folder / "transformer")
    with built_on(device, spec.dtype):
        transformer = getattr(diffusers, spec.denoiser_class)(**spec.config)
    transformer.save_pretrained(folder / "transformer")
    del transformer
    return folder


def fake_embeds(family: str, config: dict, tokens: int) -> dict[str, torch.Tensor]:
    """What the encoder node would send, with random values of the published widths (float32, CPU)."""
    generator = torch.Generator("cpu").manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, tokens, config["joint_attention_dim"], generator=generator)}
    if family == "flux":  # (1, 512, 4096) T5, (1, 768) CLIP pooled
        embeds["pooled_prompt_embeds"] = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    else:  # Qwen-Image: (1, L, 3584) Qwen2.5-VL states and their (1, L) mask
        embeds["prompt_embeds_mask"] = torch.ones(1, tokens, dtype=torch.long)
    return embeds


def fit_estimates(spec: FitSpec, config: dict, caps: Any) -> dict[str, Any]:
    """The node's own estimates for each setting, and what --max-vram picks at each budget."""
    import diffusers

    from denoiser_node import fit

    size = fit.config_size(getattr(diffusers, spec.denoiser_class), config, spec.dtype)
    weights = {s: fit.weight_bytes(s, size) / GiB for s in fit.LADDER}
    choices = {}
    for budget in BUDGETS_GIB:
        try:
            choices[budget] = fit.choose(size, caps, budget).setting
        except fit.NodeStartError:
            choices[budget] = None
    return {"parameters": size.total, "weights_gib": weights, "margin_gib": fit.DEFAULT_MARGIN_GIB, "max_vram": choices}


def measure_fit_setting(
    setting: str, folder: Path, device: str, dtype: torch.dtype, embeds: dict, request: RequestSpec, args: Any
) -> dict[str, Any]:
    """One setting: the denoiser stage loaded as the node loads it, denoising through its family."""
    from denoiser_node.fit import GROUP, PLAIN, FitOptions, FitPlan, denoiser_loader
    from protocol.stages import DENOISER
    from triptych.families.loading import load_stage

    meter = Meter(device)
    meter.reset()
    if setting in DIFFUSERS_OFFLOADS:
        stage = load_stage(str(folder), DENOISER, device="cpu", dtype=dtype)
        getattr(stage.pipe, f"enable_{setting}")(device=device)
    else:
        loader = None  # plain: diffusers' own loading, as the node does without fit flags
        if setting != PLAIN:
            options = FitOptions(offload=setting) if setting == GROUP else FitOptions(quantize=setting)
            loader = denoiser_loader(FitPlan(setting, options))
        stage = load_stage(str(folder), DENOISER, device=device, dtype=dtype, denoiser=loader)
    meter.sync()
    resident = meter.allocated()
    family, pipe = stage.family, stage.pipe

    def denoise(seed: int) -> Any:
        with torch.inference_mode():
            return family.denoise(pipe, [(embeds, dataclasses.replace(request, seed=seed))], lambda step, total: None)

    seconds, peak = meter.per_image(denoise, args.fit_images, max(args.warmup, 1))
    if setting in DIFFUSERS_OFFLOADS:
        pipe.remove_all_hooks()
    stage = pipe = None  # free the weights before the next setting loads
    meter.reset()
    return {
        "s_per_image": seconds,
        "resident_gib": None if resident is None else resident / GiB,  # after loading, before the first image
        "peak_gib": None if peak is None else peak / GiB,
    }


def measure_fit(key: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    from denoiser_node import fit
    from triptych.families import family_for_pipeline
    from triptych.families.loading import read_model_index

    spec = FIT_SPECS[key]
    cuda = device.startswith("cuda")
    dtype = spec.dtype if cuda else torch.float32
    steps = args.steps or (2 if args.tiny else 20)
    size = 64 if args.tiny else 1024
    caps = fit.DeviceCaps.of(device)
    assumed = caps if cuda else fit.DeviceCaps(**ASSUMED_GPU, torchao=caps.torchao, bitsandbytes=True, gguf=caps.gguf)
    result: dict[str, Any] = {"model": spec.name, "steps": steps, "size": f"{size}x{size}"}
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["estimates"] = fit_estimates(spec, spec.config, assumed)  # the published size, on any machine
    result["estimates_for"] = assumed.gpu_name or assumed.device
    settings = [s for s in args.fit_settings.split(",") if s]
    rows: dict[str, Any] = {}
    # Loading runs outside inference mode, as on the node (quantizers make parameters); denoising inside it.
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        start = time.perf_counter()
        folder = fit_checkpoint(spec, args.tiny, device, Path(workdir) / key)
        Meter(device).reset()
        result["build_s"] = time.perf_counter() - start
        config = dict(json.loads((folder / "transformer" / "config.json").read_text()))
        family = family_for_pipeline(read_model_index(str(folder))["_class_name"])
        embeds = fake_embeds(family.name, config, 16 if args.tiny else spec.tokens)
        request = RequestSpec(model=key, prompt=PROMPT, steps=steps, height=size, width=size, seed=0)
        for setting in settings:
            if setting in DIFFUSERS_OFFLOADS:
                why = None if cuda else f"{setting} moves weights to a GPU; this run is on {device}"
            else:
                why = fit.unsupported(setting, caps)
            if why is not None:
                rows[setting] = {"skipped": why}
                continue
            try:
                rows[setting] = measure_fit_setting(setting, folder, device, dtype, embeds, request, args)
            except torch.cuda.OutOfMemoryError:
                rows[setting] = {"skipped": "out of GPU memory"}
            if "skipped" in rows[setting]:
                Meter(device).reset()  # here, after the except block: its traceback held the weights
                continue
            if setting in fit.LADDER:
                rows[setting]["estimate_gib"] = result["estimates"]["weights_gib"][setting] if not args.tiny else None
    result["settings"] = rows
    return result


def report_fit(key: str, r: dict) -> None:
    def gib(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    estimates = r["estimates"]
    print(f"\n== fit: {r['model']} ({key}): {r['size']}, {r['steps']} steps, {r['dtype']}; denoiser only")
    print(
        f"published size {estimates['parameters'] / 1e9:.1f}B parameters; the node's estimates of its weights "
        f"(GiB, + {estimates['margin_gib']:g} GiB margin for --max-vram): "
        + ", ".join(f"{s} {w:.1f}" for s, w in estimates["weights_gib"].items())
    )
    picks = ", ".join(f"{b} GiB -> {s or 'refused'}" for b, s in estimates["max_vram"].items())
    print(f"--max-vram on {r['estimates_for']}: {picks}")
    plain = r["settings"].get("plain", {})
    rows = []
    for setting, row in r["settings"].items():
        if "skipped" in row:
            rows.append([setting, "-", "-", "-", "-", f"skipped: {row['skipped']}"])
            continue
        rows.append(
            [
                setting,
                gib(row.get("estimate_gib")),
                gib(row["resident_gib"]),
                gib(row["peak_gib"]),
                row["s_per_image"],
                "",
            ]
        )
    print(table(["setting", "estimate GiB", "resident GiB", "peak GiB", "s/image", ""], rows))
    for setting, row in r["settings"].items():
        if "skipped" in row or setting == "plain":
            continue
        speed = "n/a" if not plain.get("s_per_image") else f"{row['s_per_image'] / plain['s_per_image']:.2f}"
        memory = (
            "n/a"
            if not plain.get("peak_gib") or row["peak_gib"] is None
            else f"{row['peak_gib'] / plain['peak_gib']:.2f}"
        )
        print(f"result: {key} fit {setting}: s/image / plain s/image = {speed}; peak / plain peak = {memory}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="pixart,sdxl,flux", help="comma-separated: pixart, sdxl, flux (default all); none: skip"
    )
    parser.add_argument(
        "--fit-models",
        default="flux,qwenimage",
        help="the denoiser's fit settings for: flux, qwenimage (default both); none: skip",
    )
    parser.add_argument(
        "--fit-settings",
        default=",".join(FIT_SETTINGS),
        help=f"comma-separated (default all: {','.join(FIT_SETTINGS)})",
    )
    parser.add_argument("--fit-images", type=int, default=1, help="timed images per fit setting (default 1)")
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
    keys = [key.strip() for key in args.models.split(",") if key.strip() not in ("", "none")]
    unknown = [key for key in keys if key not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    fit_keys = [key.strip() for key in args.fit_models.split(",") if key.strip() not in ("", "none")]
    unknown = [key for key in fit_keys if key not in FIT_SPECS]
    if unknown:
        parser.error(f"unknown --fit-models {', '.join(unknown)}; choose from {', '.join(FIT_SPECS)}")
    unknown = [s for s in args.fit_settings.split(",") if s and s not in FIT_SETTINGS]
    if unknown:
        parser.error(f"unknown --fit-settings {', '.join(unknown)}; choose from {', '.join(FIT_SETTINGS)}")
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
    fits = {}
    for key in fit_keys:
        fits[key] = measure_fit(key, args, device)
        report_fit(key, fits[key])
    write_json(
        args.json,
        {
            "benchmark": "gpu_memory",
            "mode": "tiny" if args.tiny else "full",
            "machine": info,
            "models": results,
            "fit": fits,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
