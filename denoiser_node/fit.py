"""Making the denoiser fit the GPU: quantized weights, a GGUF file, group offloading, or a VRAM budget.

Settings, from the least lossy to the slowest; each is a node flag, and ``--max-vram GB`` picks the
first of them that fits:

=============  ==========================================================  ========================
setting        what diffusers does                                        runs on
=============  ==========================================================  ========================
(none)         the denoiser in the node's ``--dtype`` (bf16 for FLUX.1)     CPU, CUDA
``int8wo``     ``TorchAoConfig(Int8WeightOnlyConfig())``: int8 Linear      CPU, CUDA (torchao)
               weights with a scale per output row
``float8wo``   ``TorchAoConfig(Float8WeightOnlyConfig())``: float8 e4m3    CUDA, compute capability
               Linear weights                                              8.9+ (torchao)
``nf4``        ``BitsAndBytesConfig(load_in_4bit=True, nf4)``: 4-bit       CUDA (bitsandbytes)
               NormalFloat Linear weights, blocks of 64
``group``      ``enable_group_offload(block_level, use_stream=True)``:     CUDA
               weights in pinned host memory, each block copied in on a
               side stream while the one before it runs
=============  ==========================================================  ========================

``--denoiser-file PATH.gguf`` loads a GGUF transformer (``from_single_file`` with
``GGUFQuantizationConfig``, config from the model folder): the file's own quantization, for the
denoiser classes diffusers' single-file loader knows (FLUX.1, FLUX.2, SD3, Sana, Qwen-Image,
Z-Image, SD UNets).

What each setting needs is estimated before any weight is read, from the denoiser's config built
on the meta device: the bytes of its weights as that setting stores them (on the GPU at once: all
of them, or with group offload the parts outside the blocks plus two blocks, the one running and
the one being copied in) plus an activation margin, ``--vram-margin`` (default 3 GiB: FLUX.1-dev
at 1024² takes 0.45 GiB of activations per image, docs/benchmarks.md, so a batch of four with
room for the allocator). The choice itself, :func:`choose`, is a pure function.

Combinations refused at start: ``--fuse-qkv`` with any of these (it concatenates plain weights), and
LoRA adapters (``--lora-dir``) with the torchao kinds or group offload (see ``NO_LORAS``); a GGUF
file and nf4 take adapters.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triptych.node_runner import NodeStartError

if TYPE_CHECKING:
    import torch

    from triptych.families import Family

logger = logging.getLogger(__name__)

GiB = 2**30
PLAIN = "plain"  # the denoiser in the node's dtype, no quantization, all on the GPU
GROUP = "group"  # group offloading
GGUF = "gguf"  # --denoiser-file
QUANTIZE_KINDS = {
    "int8wo": "torchao int8 weight-only",
    "float8wo": "torchao float8 weight-only (CUDA, compute capability 8.9+)",
    "nf4": "bitsandbytes 4-bit NormalFloat (CUDA)",
}
OFFLOAD_KINDS = {GROUP: "diffusers group offloading, block level, CUDA streams, weights in pinned host memory"}
LADDER = (PLAIN, "int8wo", "float8wo", "nf4", GROUP)  # least lossy first; --max-vram takes the first that fits
DEFAULT_MARGIN_GIB = 3.0
FLOAT8_CAPABILITY = (8, 9)  # Ada and newer: float8 e4m3 tensors
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one float32 absmax per block
SCALE_BYTES = 4  # torchao's weight-only scales: one float32 per output row, whatever the compute dtype
# Settings that cannot take LoRA adapters (--lora-dir): torchao's tensors refuse the adapters' loading
# under inference mode; group offloading moves only the weights it found when it was set up.
NO_LORAS = {"int8wo", "float8wo", GROUP}


# --- flags ----------------------------------------------------------------------------------


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = ", ".join(f"{name} ({what})" for name, what in QUANTIZE_KINDS.items())
    parser.add_argument("--quantize", choices=QUANTIZE_KINDS, help=f"quantize the denoiser's weights: {kinds}")
    parser.add_argument(
        "--denoiser-file", metavar="PATH.gguf", help="load the denoiser from a GGUF file (config from --model)"
    )
    parser.add_argument("--offload", choices=OFFLOAD_KINDS, help=f"offload the denoiser's weights: {GROUP} (CUDA only)")
    parser.add_argument(
        "--max-vram",
        type=float,
        metavar="GB",
        help="GPU memory the denoiser may use (GiB): start with the least lossy setting that fits",
    )
    parser.add_argument(
        "--vram-margin",
        type=float,
        default=DEFAULT_MARGIN_GIB,
        metavar="GB",
        help=f"activation margin added to each setting's weights for --max-vram (default {DEFAULT_MARGIN_GIB:g} GiB)",
    )


@dataclass(frozen=True)
class FitOptions:
    quantize: str | None = None  # a key of QUANTIZE_KINDS
    denoiser_file: Path | None = None  # a .gguf file
    offload: str | None = None  # a key of OFFLOAD_KINDS
    max_vram_gib: float | None = None  # budget for --max-vram
    margin_gib: float = DEFAULT_MARGIN_GIB  # activations, added to each setting's weights
    loras: bool = False  # the node serves LoRA adapters (--lora-dir)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FitOptions:
        """The flags, checked on their own (no torch, no files read but the GGUF's first bytes)."""
        quantize, offload = args.quantize, args.offload
        if quantize is not None and quantize not in QUANTIZE_KINDS:
            raise NodeStartError(f"--quantize: unknown kind {quantize!r}; choose from {_listed(QUANTIZE_KINDS)}")
        if offload is not None and offload not in OFFLOAD_KINDS:
            raise NodeStartError(f"--offload: unknown kind {offload!r}; choose from {_listed(OFFLOAD_KINDS)}")
        if quantize is not None and offload is not None:
            raise NodeStartError("--quantize and --offload: choose one (group offloading keeps the --dtype weights)")
        path = None
        if args.denoiser_file is not None:
            if quantize is not None or offload is not None:
                raise NodeStartError(
                    "--denoiser-file: a GGUF file is already quantized; leave out --quantize/--offload"
                )
            path = check_gguf_file(args.denoiser_file)
        if args.max_vram is not None and not args.max_vram > 0:
            raise NodeStartError(f"--max-vram must be a positive number of GiB (got {args.max_vram:g})")
        if not args.vram_margin >= 0:
            raise NodeStartError(f"--vram-margin must be 0 or more GiB (got {args.vram_margin:g})")
        return cls(
            quantize, path, offload, args.max_vram, args.vram_margin, getattr(args, "lora_dir", None) is not None
        )

    @property
    def asked(self) -> str | None:
        """The setting the flags name, if any."""
        if self.denoiser_file is not None:
            return GGUF
        return self.quantize or self.offload


def _listed(kinds: dict[str, str]) -> str:
    return ", ".join(f"{name} ({what})" for name, what in kinds.items())


def check_gguf_file(path: str) -> Path:
    """The file, if it exists and is a GGUF file (its magic bytes), else a clear error."""
    file = Path(path)
    if not file.is_file():
        raise NodeStartError(f"--denoiser-file: no such file: {path}")
    with file.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise NodeStartError(f"--denoiser-file: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return file


# --- what the device can run ----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCaps:
    """What the node's device offers the settings."""

    device: str  # "cpu", "cuda", "cuda:1"
    capability: tuple[int, int] | None = None  # CUDA compute capability; None on a CPU
    gpu_name: str = ""
    torchao: bool = False  # the package is installed
    bitsandbytes: bool = False
    gguf: bool = False

    @property
    def cuda(self) -> bool:
        return self.capability is not None

    @classmethod
    def of(cls, device: str) -> DeviceCaps:
        import torch

        capability, name = None, ""
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise NodeStartError(f"--device {device}: this machine's torch sees no CUDA device")
            capability = tuple(torch.cuda.get_device_capability(device))
            name = torch.cuda.get_device_name(device)
        return cls(
            device,
            capability,  # type: ignore[arg-type]
            name,
            torchao=_installed("torchao"),
            bitsandbytes=_installed("bitsandbytes"),
            gguf=_installed("gguf"),
        )


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def unsupported(setting: str, caps: DeviceCaps, loras: bool = False) -> str | None:
    """Why ``setting`` cannot run on this device (or with LoRA adapters), or None when it can."""
    flag = {GGUF: "--denoiser-file", GROUP: "--offload group"}.get(setting, f"--quantize {setting}")
    where = f"this denoiser runs on {caps.device}"
    if loras and setting in NO_LORAS:
        return f"{flag} cannot take the LoRA adapters of --lora-dir (use nf4 or a GGUF file, or no adapters)"
    if setting in ("int8wo", "float8wo") and not caps.torchao:
        return f"{flag} needs torchao: pip install torchao"
    if setting == "float8wo":
        if not caps.cuda:
            return f"{flag} needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); {where}"
        if caps.capability < FLOAT8_CAPABILITY:
            major, minor = caps.capability
            return f"{flag} needs compute capability 8.9 or newer; {caps.gpu_name} has {major}.{minor}: use int8wo"
    if setting == "nf4":
        if not caps.cuda:
            return f"{flag} runs on CUDA GPUs only (bitsandbytes); {where}: use int8wo"
        if not caps.bitsandbytes:
            return f"{flag} needs bitsandbytes: pip install bitsandbytes"
    if setting == GROUP and not caps.cuda:
        return f"{flag} copies weights from host memory to a GPU as it runs; {where}, where it means nothing"
    if setting == GGUF and not caps.gguf:
        return f"{flag} needs the gguf package: pip install gguf"
    return None


# --- how much each setting needs ------------------------------------------------------------


@dataclass(frozen=True)
class DenoiserSize:
    """The denoiser's weights, counted from its config (no weights read)."""

    linear_weights: int  # elements of nn.Linear weight matrices: what the quantizers convert
    linear_rows: int  # their output rows (one scale each for int8/float8 weight-only)
    other: int  # every other parameter and buffer element (biases, norms, convolutions, embeddings)
    outside_blocks: int  # elements outside the top-level block lists: on the GPU throughout with group offload
    largest_block: int  # elements of the largest block
    element_size: int  # bytes per element in the node's dtype
    gguf_bytes: int | None = None  # with --denoiser-file: the file's tensor bytes

    @property
    def total(self) -> int:
        return self.linear_weights + self.other


def weight_bytes(setting: str, size: DenoiserSize) -> int:
    """Bytes on the GPU for the denoiser's weights in ``setting``."""
    if setting == GGUF:
        if size.gguf_bytes is None:
            raise ValueError("a GGUF setting needs the file's size")
        return size.gguf_bytes
    if setting == PLAIN:
        return size.total * size.element_size
    if setting in ("int8wo", "float8wo"):  # one byte per weight, a float32 scale per row
        return size.linear_weights + size.linear_rows * SCALE_BYTES + size.other * size.element_size
    if setting == "nf4":  # half a byte per weight, a float32 absmax per block of 64
        return size.linear_weights // 2 + 4 * -(-size.linear_weights // NF4_BLOCK) + size.other * size.element_size
    if setting == GROUP:  # the rest of the model, the block running and the block coming in
        return (size.outside_blocks + 2 * size.largest_block) * size.element_size
    raise ValueError(f"unknown setting {setting!r}")


@dataclass(frozen=True)
class Estimate:
    setting: str
    weights_gib: float
    need_gib: float  # weights + margin
    why_not: str | None  # None when the device runs it


@dataclass(frozen=True)
class Choice:
    setting: str
    estimates: tuple[Estimate, ...]

    @property
    def chosen(self) -> Estimate:
        return next(e for e in self.estimates if e.setting == self.setting)


def describe(setting: str, dtype_name: str = "") -> str:
    if setting == PLAIN:
        return dtype_name or "unquantized"
    if setting == GGUF:
        return "GGUF file"
    return setting if setting != GROUP else "group offload"


def choose(
    size: DenoiserSize,
    caps: DeviceCaps,
    max_vram_gib: float,
    margin_gib: float = DEFAULT_MARGIN_GIB,
    candidates: Sequence[str] = LADDER,
    loras: bool = False,
) -> Choice:
    """The first of ``candidates`` the device runs whose weights plus ``margin_gib`` fit ``max_vram_gib``.

    Raises NodeStartError naming every candidate's need when none fits.
    """
    estimates = []
    for setting in candidates:
        weights = weight_bytes(setting, size) / GiB
        estimates.append(Estimate(setting, weights, weights + margin_gib, unsupported(setting, caps, loras)))
    for estimate in estimates:
        if estimate.why_not is None and estimate.need_gib <= max_vram_gib:
            return Choice(estimate.setting, tuple(estimates))
    needs = "; ".join(
        f"{describe(e.setting)} needs {e.need_gib:.1f} GiB" + (f" (and cannot run: {e.why_not})" if e.why_not else "")
        for e in estimates
    )
    raise NodeStartError(
        f"--max-vram {max_vram_gib:g}: nothing fits: {needs}; each need is the weights plus "
        f"a {margin_gib:g} GiB activation margin (--vram-margin)"
    )


# --- the plan: flags + device -> one setting ------------------------------------------------


@dataclass(frozen=True)
class FitPlan:
    setting: str
    options: FitOptions
    estimate: Estimate | None = None  # with --max-vram

    def info(self, dtype: torch.dtype) -> dict[str, Any]:
        """For the node's info (`triptych status`)."""
        dtype_name = str(dtype).removeprefix("torch.")
        info: dict[str, Any] = {"fit": describe(self.setting, dtype_name)}
        if self.options.denoiser_file is not None:
            info["denoiser_file"] = self.options.denoiser_file.name
        if self.estimate is not None:
            info["vram_estimate_gib"] = round(self.estimate.need_gib, 2)
            info["max_vram_gib"] = self.options.max_vram_gib
        return info


def plan(options: FitOptions, caps: DeviceCaps, size: DenoiserSize | None = None) -> FitPlan:
    """The setting the node runs; ``size`` is needed only with --max-vram."""
    asked = options.asked
    if asked is not None:
        why = unsupported(asked, caps, options.loras)
        if why is not None:
            raise NodeStartError(why)
    if options.max_vram_gib is None:
        return FitPlan(asked or PLAIN, options)
    if not caps.cuda:
        raise NodeStartError(f"--max-vram limits GPU memory; this denoiser runs on {caps.device}")
    if size is None:
        raise ValueError("--max-vram needs the denoiser's size")
    candidates = (asked,) if asked else LADDER
    choice = choose(size, caps, options.max_vram_gib, options.margin_gib, candidates, options.loras)
    return FitPlan(choice.setting, options, choice.chosen)


# --- reading the denoiser's size and loading it ---------------------------------------------


def denoiser_class(model: str, family: Family) -> type:
    import diffusers

    from triptych.families.loading import read_model_index

    library, name = read_model_index(model)[family.denoiser_attr]
    if library != "diffusers":
        raise NodeStartError(f"{model}: its {family.denoiser_attr} is a {library} class, not a diffusers one")
    return getattr(diffusers, name)


def denoiser_size(model: str, family: Family, dtype: torch.dtype, gguf: Path | None = None) -> DenoiserSize:
    """Count the denoiser's weights from its config.json (no weights read)."""
    cls = denoiser_class(model, family)
    return config_size(cls, dict(cls.load_config(model, subfolder=family.denoiser_attr)), dtype, gguf)


def config_size(cls: type, config: dict, dtype: torch.dtype, gguf: Path | None = None) -> DenoiserSize:
    """Count the weights of a ``cls`` built from ``config`` on the meta device."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        module = cls.from_config(config)
    linear = rows = 0
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            linear += sub.weight.numel()
            rows += sub.weight.shape[0]
    everything = sum(t.numel() for t in [*module.parameters(), *module.buffers()])
    blocks = [
        sum(p.numel() for p in block.parameters())
        for child in module.children()
        if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential)
        for block in child
    ]
    return DenoiserSize(
        linear_weights=linear,
        linear_rows=rows,
        other=everything - linear,
        outside_blocks=everything - sum(blocks),
        largest_block=max(blocks, default=0),
        element_size=torch.empty(0, dtype=dtype).element_size(),
        gguf_bytes=gguf_tensor_bytes(gguf) if gguf is not None else None,
    )


def check_single_file_class(cls: type, family: Family) -> None:
    """A GGUF file loads only into the denoiser classes diffusers' single-file loader knows."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    if cls.__name__ not in SINGLE_FILE_LOADABLE_CLASSES:
        raise NodeStartError(
            f"--denoiser-file: diffusers' single-file loader cannot load a {cls.__name__} ({family.name}); "
            f"it loads {', '.join(name for name in SINGLE_FILE_LOADABLE_CLASSES if 'Transformer' in name or 'UNet' in name)}"
        )


def gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)


def load_denoiser(fit: FitPlan, model: str, family: Family, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The denoiser in ``fit``'s setting, already where it runs (on ``device``, or group-offloaded)."""
    import diffusers
    import torch

    cls = denoiser_class(model, family)
    attr, setting, cuda = family.denoiser_attr, fit.setting, device.startswith("cuda")
    placed = {"device_map": device} if cuda else {}  # quantized straight onto the GPU, layer by layer
    if setting == GGUF:
        path = fit.options.denoiser_file
        check_single_file_class(cls, family)
        logger.info("loading the %s %s from GGUF file %s", family.name, cls.__name__, path)
        config = diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
        module = cls.from_single_file(
            str(path), config=model, subfolder=attr, quantization_config=config, torch_dtype=dtype
        )
        return module.to(device)
    if setting == GROUP:
        logger.info(
            "loading the %s %s into pinned host memory, group-offloaded to %s", family.name, cls.__name__, device
        )
        module = cls.from_pretrained(model, subfolder=attr, torch_dtype=dtype)
        module.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,  # with streams diffusers runs one block per group, the next one prefetched
            use_stream=True,
            low_cpu_mem_usage=False,  # pin every weight once, up front: copies from pinned memory run async
        )
        return module
    logger.info("loading the %s %s quantized %s (%s)", family.name, cls.__name__, setting, QUANTIZE_KINDS[setting])
    module = cls.from_pretrained(
        model, subfolder=attr, torch_dtype=dtype, quantization_config=quantization_config(setting, dtype), **placed
    )
    return module if cuda else module.to(device)


def quantization_config(setting: str, dtype: torch.dtype) -> Any:
    """diffusers' quantization config for a --quantize kind."""
    import diffusers

    if setting == "int8wo":
        from torchao.quantization import Int8WeightOnlyConfig

        return diffusers.TorchAoConfig(Int8WeightOnlyConfig())
    if setting == "float8wo":
        from torchao.quantization import Float8WeightOnlyConfig

        return diffusers.TorchAoConfig(Float8WeightOnlyConfig())
    if setting == "nf4":
        return diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(f"unknown quantization kind {setting!r}")


# --- the node's entry ------------------------------------------------------------------------


def fit_from_args(args: argparse.Namespace, model: str, family: Family, device: str, dtype: torch.dtype) -> FitPlan:
    """The flags, checked against the device (and with --max-vram, the denoiser's size); logs the choice."""
    options = FitOptions.from_args(args)
    if options.denoiser_file is not None:
        check_single_file_class(denoiser_class(model, family), family)
    caps = DeviceCaps.of(device)
    measured = options.max_vram_gib is not None and caps.cuda  # on a CPU, plan() refuses --max-vram
    size = denoiser_size(model, family, dtype, options.denoiser_file) if measured else None
    fit = plan(options, caps, size)
    dtype_name = str(dtype).removeprefix("torch.")
    if getattr(args, "fuse_qkv", False) and fit.setting != PLAIN:  # it concatenates plain weight tensors
        raise NodeStartError(f"--fuse-qkv cannot fuse the weights of {describe(fit.setting)}: leave one out")
    if fit.estimate is not None:
        logger.info(
            "--max-vram %g: running the denoiser as %s (needs about %.1f GiB: %.1f of weights + %g margin)",
            options.max_vram_gib,
            describe(fit.setting, dtype_name),
            fit.estimate.need_gib,
            fit.estimate.weights_gib,
            options.margin_gib,
        )
    elif fit.setting != PLAIN:
        logger.info("running the denoiser as %s", describe(fit.setting, dtype_name))
    return fit


def denoiser_loader(fit: FitPlan) -> Any:
    """What ``load_stage(denoiser=...)`` takes: None for the plain setting (diffusers' own loading)."""
    if fit.setting == PLAIN:
        return None
    return lambda model, family, device, dtype: load_denoiser(fit, model, family, device, dtype)
