"""LoRA adapters: a node's folder of them, loaded into its pipeline on demand, activated per batch.

A node started with ``--lora-dir DIR`` serves every ``DIR/NAME.safetensors`` by its NAME, in any
format diffusers' ``load_lora_weights`` reads (diffusers/PEFT, kohya / AUTOMATIC1111, and the
others its converters know). Clients name adapters, never paths. The folder is listed again for
every request (one directory scan), so a file dropped in is served without a restart, and a file
that changed (size or modification time) is loaded again.

Each node loads only its own part of an adapter, through the diffusers code that loads the whole:
the denoiser its UNet/transformer layers (the pipeline's ``load_lora_weights``, with the text
encoders it does not hold skipped), the encoder its text encoders' layers (the pipeline's
``load_lora_into_text_encoder`` for each of them, called as ``load_lora_weights`` calls it). A
request's set is then activated as diffusers' ``set_adapters(names, weights)`` does it, component
by component, and a request with none runs with the LoRA layers disabled (``disable_lora``). So
images equal those of a whole diffusers pipeline with the same adapters loaded and set.

Loaded adapters are kept, least recently used first out, within a byte budget
(``--lora-cache-mb``); the adapters of the batch at hand are never evicted for it.

With ``torch.compile`` (``hotswap``), a change of adapters must not change the compiled graph.
diffusers' ``enable_lora_hotswap`` is called before compiling (ranks padded to one target rank,
scales held as tensors); adapters then live in slots: a new one is swapped into a free slot's
weights in place (``load_lora_weights(..., hotswap=True)``), and every slot runs in every batch,
those the batch does not use at weight 0. Only a new slot (a request with more adapters than any
before) or an adapter that does not fit a slot's layers makes the model compile again.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import RequestError
from protocol.validation import LORA_NAME, loras_problem

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the encoder node's parts of an adapter
DEFAULT_CACHE_MB = 1024
DEFAULT_HOTSWAP_RANK = 128  # diffusers' own default target_rank for enable_lora_hotswap
_LISTED_CHARS = 300  # of adapter names in an error: the rest are counted, not listed


def add_lora_arguments(parser: argparse.ArgumentParser, hotswap: bool = False) -> None:
    """The nodes' LoRA flags (``hotswap``: the denoiser's, whose --compile needs a rank bound)."""
    parser.add_argument(
        "--lora-dir", metavar="DIR", help="serve the LoRA adapters DIR/NAME.safetensors by NAME (read as requests come)"
    )
    parser.add_argument(
        "--lora-cache-mb",
        type=int,
        default=DEFAULT_CACHE_MB,
        help=f"memory for loaded LoRA adapters, least recently used out first (default {DEFAULT_CACHE_MB})",
    )
    if hotswap:
        parser.add_argument(
            "--lora-max-rank",
            type=int,
            default=DEFAULT_HOTSWAP_RANK,
            help=f"with --compile: the highest LoRA rank swapped in without compiling again (default {DEFAULT_HOTSWAP_RANK})",
        )


def adapters_from_args(args: argparse.Namespace, pipe: Any, parts: tuple[str, ...]) -> LoraAdapters | None:
    """The node's adapters from its flags, None without --lora-dir; ValueError names a bad flag."""
    if args.lora_dir is None:
        return None
    if args.lora_cache_mb < 0:
        raise ValueError(f"--lora-cache-mb must be 0 or more (got {args.lora_cache_mb})")
    adapters = LoraAdapters(pipe, LoraFolder(args.lora_dir), args.lora_cache_mb << 20, parts)
    logger.info("serving %d LoRA adapter(s) from %s", len(adapters.folder.names()), args.lora_dir)
    return adapters


def lora_key(loras: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """A request's adapters as a hashable key: requests with equal keys may share a batch.

    In the request's order: the adapters' outputs are summed in that order, as ``set_adapters`` with
    the names in that order sums them, and float sums depend on it.
    """
    return tuple((name, float(weight)) for name, weight in loras.items())


@dataclass(frozen=True)
class AdapterFile:
    name: str
    path: Path
    signature: tuple[int, int]  # (size, mtime_ns): a file that changed is loaded again


class LoraFolder:
    """The adapters of ``--lora-dir``: each ``NAME.safetensors`` in it, listed afresh on every look."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"--lora-dir: {self.path} is not a folder")

    def files(self) -> dict[str, AdapterFile]:
        found: dict[str, AdapterFile] = {}
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name.removesuffix(SUFFIX)
                if entry.name.endswith(SUFFIX) and LORA_NAME.fullmatch(name) and entry.is_file():
                    stat = entry.stat()
                    found[name] = AdapterFile(name, Path(entry.path), (stat.st_size, stat.st_mtime_ns))
        return found

    def names(self) -> list[str]:
        return sorted(self.files())

    def resolve(self, loras: Mapping[str, float]) -> list[tuple[AdapterFile, float]]:
        """The files and weights of a request's adapters, by name; RequestError naming ``loras`` otherwise."""
        if (problem := loras_problem(loras)) is not None:
            raise RequestError(*problem)
        files = self.files() if loras else {}
        missing = sorted(name for name in loras if name not in files)
        if missing:
            raise RequestError(
                "loras",
                f"unknown LoRA adapter {', '.join(map(repr, missing))}: this node's folder has {_listing(sorted(files))}",
            )
        return [(files[name], weight) for name, weight in lora_key(loras)]


def _listing(names: list[str]) -> str:
    if not names:
        return "none"
    shown: list[str] = []
    for name in names:
        if sum(len(item) + 2 for item in shown) + len(name) > _LISTED_CHARS:
            return f"{', '.join(shown)} and {len(names) - len(shown)} more"
        shown.append(name)
    return ", ".join(shown)


@contextlib.contextmanager
def installed_peft_accepted() -> Iterator[None]:
    """Let transformers load text-encoder adapters with the peft that is installed.

    transformers 5 refuses, by version number alone, any peft older than its ``MIN_PEFT_VERSION``
    (0.22 at this writing, newer than any peft on PyPI), and diffusers loads text-encoder LoRA
    layers through it. The path diffusers takes (``load_adapter`` with a state dict and a
    ``LoraConfig``) works with peft 0.21: tests/test_lora.py compares the images with the adapter's
    text-encoder part against diffusers. Outside that path nothing is relaxed.
    """
    try:
        import transformers.integrations.peft as integration
    except ImportError:  # transformers without its peft integration: nothing to relax
        yield
        return
    required = getattr(integration, "MIN_PEFT_VERSION", None)
    installed = importlib.metadata.version("peft")
    integration.MIN_PEFT_VERSION = installed
    try:
        yield
    finally:
        integration.MIN_PEFT_VERSION = required


@contextlib.contextmanager
def _modules_unwrapped(pipe: Any, names: tuple[str, ...]) -> Iterator[None]:
    """Load into the modules themselves, not a ``torch.compile`` wrapper of them (which diffusers' loader
    does not recognize as a model); the wrapper runs the same module, LoRA layers included."""
    wrapped = {name: getattr(pipe, name) for name in names if hasattr(getattr(pipe, name), "_orig_mod")}
    for name, module in wrapped.items():
        setattr(pipe, name, module._orig_mod)
    try:
        yield
    finally:
        for name, module in wrapped.items():
            setattr(pipe, name, module)


@contextlib.contextmanager
def _absent_text_encoders_skipped(pipe: Any) -> Iterator[None]:
    """``load_lora_weights`` on a pipeline that holds no text encoders: their part of the file is left to
    the encoder node (diffusers would otherwise call into a text encoder of None)."""
    load = pipe.load_lora_into_text_encoder

    def load_present(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("text_encoder") is not None:
            load(*args, **kwargs)

    pipe.__dict__["load_lora_into_text_encoder"] = load_present
    try:
        yield
    finally:
        del pipe.__dict__["load_lora_into_text_encoder"]


def _module(pipe: Any, name: str) -> Any:
    module = getattr(pipe, name, None)
    return getattr(module, "_orig_mod", module)


@dataclass
class _Loaded:
    file: AdapterFile
    adapter: str  # the adapter's name inside the pipeline's modules (PEFT's; it may not hold a '.')
    size: int  # bytes of its layers on this node
    present: bool  # whether it has layers on this node's components at all


class LoraAdapters:
    """The adapters loaded into one node's pipeline, and which of them run for the batch at hand.

    ``parts``: the pipeline components this node loads adapters into -- the denoiser's UNet or
    transformer, or the encoder's text encoders. Used from the node's one job thread.
    """

    def __init__(
        self, pipe: Any, folder: LoraFolder, max_bytes: int, parts: tuple[str, ...], hotswap: bool = False
    ) -> None:
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"--lora-dir: {type(pipe).__name__} loads no LoRA adapters")
        loadable = tuple(getattr(pipe, "_lora_loadable_modules", ()))
        self.pipe = pipe
        self.folder = folder
        self.max_bytes = max_bytes
        self.parts = tuple(name for name in parts if name in loadable and getattr(pipe, name, None) is not None)
        self.text_encoders = all(name.startswith("text_encoder") for name in self.parts)
        self.hotswap = hotswap
        self.loads = 0
        self.evictions = 0
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # by file name, least recently used first
        self._slots: list[_Loaded | None] = []  # hotswap: slot i is the adapter named slot{i}
        self._slot_order: list[int] = []  # hotswap: slots least recently used first
        self._units: dict[tuple[str, str], float] = {}  # hotswap: (slot, layer) -> its scale at weight 1
        self._serial = 0
        self._active: tuple | None = None  # what the modules are set to now; None: unknown

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self._all())

    def _all(self) -> list[_Loaded]:
        return [entry for entry in self._slots if entry is not None] if self.hotswap else list(self._loaded.values())

    def enable_hotswap(self, target_rank: int) -> None:
        """Before the denoiser is compiled and before any adapter is loaded (diffusers' requirement)."""
        self.hotswap = True
        for name in self.parts:
            _module(self.pipe, name).enable_lora_hotswap(target_rank=target_rank)
        logger.info("LoRA hotswap on: adapters up to rank %d swap in without compiling again", target_rank)

    def stats(self) -> dict[str, int]:
        return {"lora_loads": self.loads, "lora_evictions": self.evictions, "lora_bytes": self.bytes}

    # --- activation ----------------------------------------------------------------------------

    def activate(self, loras: Mapping[str, float]) -> dict[str, float]:
        """Load what is missing of these adapters and set the pipeline to run exactly them.

        Returns the adapters (name -> weight) that have layers on this node: what changes its output.
        """
        chosen = self.folder.resolve(loras)
        if not chosen and not self._all():
            return {}
        if self.hotswap:
            return self._activate_slots(chosen)
        entries = [(self._entry(file), weight) for file, weight in chosen]
        self._evict(keep={entry.file.name for entry, _ in entries})
        running = [(entry, weight) for entry, weight in entries if entry.present]
        self._set([entry.adapter for entry, _ in running], [weight for _, weight in running])
        return {entry.file.name: weight for entry, weight in running}

    def _entry(self, file: AdapterFile) -> _Loaded:
        entry = self._loaded.get(file.name)
        if entry is not None and entry.file.signature != file.signature:
            logger.info("LoRA adapter %s changed on disk: loading it again", file.name)
            self._delete(self._loaded.pop(file.name))
            entry = None
        if entry is None:
            self._serial += 1
            entry = self._load(file, f"lora{self._serial}_{file.name.replace('.', '_')}")
            self._loaded[file.name] = entry
        self._loaded.move_to_end(file.name)
        return entry

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._loaded):
            if self.bytes <= self.max_bytes:
                return
            if name not in keep:
                logger.info("LoRA adapter %s evicted (cache over %d MB)", name, self.max_bytes >> 20)
                self._delete(self._loaded.pop(name))
                self.evictions += 1

    def _activate_slots(self, chosen: list[tuple[AdapterFile, float]]) -> dict[str, float]:
        weights: dict[int, float] = {}
        pending = []
        for file, weight in chosen:
            slot = next(
                (
                    i
                    for i, entry in enumerate(self._slots)
                    if entry is not None and entry.file == file and i not in weights
                ),
                None,
            )
            if slot is None:
                pending.append((file, weight))
            else:
                weights[slot] = weight
        for file, weight in pending:
            free = [i for i in self._slot_order if i not in weights]  # least recently used first
            slot = free[0] if free else len(self._slots)
            weights[slot] = weight
            self._fill_slot(slot, file)
        self._slot_order = [i for i in self._slot_order if i not in weights] + sorted(weights)
        slots = [(i, entry) for i, entry in enumerate(self._slots) if entry is not None and entry.present]
        self._scale_slots({f"slot{i}": weights.get(i, 0.0) for i, _ in slots})
        return {entry.file.name: weights[i] for i, entry in slots if i in weights}

    def _lora_layers(self) -> Iterator[tuple[str, Any]]:
        from peft.tuners.lora import LoraLayer

        for part in self.parts:
            for key, module in _module(self.pipe, part).named_modules():
                if isinstance(module, LoraLayer):
                    yield f"{part}.{key}", module

    def _scale_slots(self, weights: dict[str, float]) -> None:
        """Hotswap: every slot stays active, and its weight goes into its scale tensors in place.

        ``set_adapters`` would put floats there (PEFT's ``set_scale``), on which the compiled graph
        guards; a slot's scale at weight 1 is kept from when its adapter was loaded.
        """
        import torch

        state = (tuple(weights), tuple(weights.values()))
        if state == self._active:
            return
        names = list(weights)
        for key, module in self._lora_layers():
            if list(module.active_adapters) != names or module.disable_adapters:
                module.enable_adapters(True)
                module.set_adapter(names)
            for adapter, weight in weights.items():
                unit = self._units.get((adapter, key))
                if unit is None:  # the slot's adapter has no layer here
                    continue
                if isinstance(module.scaling[adapter], torch.Tensor):
                    module.scaling[adapter].fill_(unit * weight)
                else:
                    module.scaling[adapter] = unit * weight
        self._active = state

    def _keep_units(self, adapter: str) -> None:
        """Hotswap: the scales a slot's adapter was loaded with (its weight-1 scales)."""
        self._units = {key: unit for key, unit in self._units.items() if key[0] != adapter}
        for key, module in self._lora_layers():
            if adapter in module.scaling:
                self._units[adapter, key] = float(module.scaling[adapter])

    def _reset_units(self, adapter: str) -> None:
        """Hotswap: put a slot's weight-1 scales back before another adapter is swapped into it, so that
        whatever scale the swap leaves as it was is the right one."""
        for key, module in self._lora_layers():
            unit = self._units.get((adapter, key))
            if unit is not None and hasattr(module.scaling[adapter], "fill_"):
                module.scaling[adapter].fill_(unit)

    def _fill_slot(self, slot: int, file: AdapterFile) -> None:
        name = f"slot{slot}"
        if slot == len(self._slots):
            self._slots.append(None)
            self._slot_order.append(slot)
        old = self._slots[slot]
        if old is not None and old.present:
            try:
                self._reset_units(name)
                self._slots[slot] = self._load(file, name, hotswap=True)
                self._keep_units(name)
                return
            except (ValueError, RuntimeError, KeyError) as exc:
                logger.warning(
                    "LoRA adapter %s does not fit slot %d (%s): loading it anew, which recompiles", file.name, slot, exc
                )
        if old is not None:
            self._delete(old)
        self._slots[slot] = self._load(file, name)
        self._keep_units(name)

    def _set(self, adapters: list[str], weights: list[float], disable: bool = True) -> None:
        """diffusers' ``set_adapters`` (or ``disable_lora`` for none), component by component."""
        state = (tuple(adapters), tuple(weights))
        if state == self._active:
            return
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        for name in self.parts:
            module = _module(self.pipe, name)
            if not getattr(module, "peft_config", None):
                continue
            if self.text_encoders:
                if adapters or not disable:
                    enable_lora_for_text_encoder(module)
                    set_adapters_for_text_encoder(adapters, module, list(weights))
                else:
                    disable_lora_for_text_encoder(module)
            elif adapters or not disable:
                module.enable_lora()
                module.set_adapters(adapters, list(weights))
            else:
                module.disable_lora()
        self._active = state

    # --- loading -------------------------------------------------------------------------------

    def _load(self, file: AdapterFile, adapter: str, hotswap: bool = False) -> _Loaded:
        self._active = None
        logger.info("loading LoRA adapter %s (%s) into %s", file.name, file.path, ", ".join(self.parts))
        try:
            with installed_peft_accepted(), _modules_unwrapped(self.pipe, self.parts):
                if self.text_encoders:
                    self._load_text_encoders(file, adapter)
                else:
                    with _absent_text_encoders_skipped(self.pipe):
                        self.pipe.load_lora_weights(
                            str(file.path.parent), weight_name=file.path.name, adapter_name=adapter, hotswap=hotswap
                        )
        except Exception as exc:
            if not hotswap:
                self._delete(_Loaded(file, adapter, 0, True))  # whatever layers it got before failing
            if isinstance(exc, OSError | ValueError | RuntimeError | KeyError):
                raise RequestError("loras", f"LoRA adapter {file.name!r} cannot be loaded here: {exc}") from exc
            raise
        self.loads += 1
        size = sum(
            parameter.numel() * parameter.element_size()
            for name in self.parts
            for key, parameter in _module(self.pipe, name).named_parameters()
            if f".{adapter}." in key
        )
        present = any(adapter in getattr(_module(self.pipe, name), "peft_config", {}) for name in self.parts)
        if not present:
            logger.info("LoRA adapter %s has no layers for %s here", file.name, ", ".join(self.parts))
        return _Loaded(file, adapter, size, present)

    def _load_text_encoders(self, file: AdapterFile, adapter: str) -> None:
        """What ``load_lora_weights`` does for each text encoder: the converted state dict, then
        ``load_lora_into_text_encoder`` with the text encoder's own prefix."""
        pipe = self.pipe
        options: dict[str, Any] = {"weight_name": file.path.name, "return_lora_metadata": True}
        if "return_alphas" in inspect.signature(pipe.lora_state_dict).parameters:
            options["return_alphas"] = True  # FLUX.1: its load_lora_weights asks for them
        loaded = pipe.lora_state_dict(str(file.path.parent), **options)
        state_dict, alphas, metadata = loaded if len(loaded) == 3 else (loaded[0], None, loaded[1])
        for name in self.parts:
            pipe.load_lora_into_text_encoder(
                state_dict,
                network_alphas=alphas,
                text_encoder=getattr(pipe, name),
                prefix=name,
                lora_scale=pipe.lora_scale,
                adapter_name=adapter,
                metadata=metadata,
                _pipeline=pipe,
            )

    def _delete(self, entry: _Loaded) -> None:
        self._active = None
        from diffusers.utils.peft_utils import delete_adapter_layers

        with installed_peft_accepted():
            for name in self.parts:
                module = _module(self.pipe, name)
                if entry.adapter not in (getattr(module, "peft_config", None) or {}):
                    continue
                if self.text_encoders:
                    delete_adapter_layers(module, entry.adapter)
                else:
                    module.delete_adapters([entry.adapter])
