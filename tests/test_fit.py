"""Fitting the denoiser to the GPU (denoiser_node.fit): the chooser as a pure function, every flag's
error paths, a GGUF file against its dequantized weights, and int8 weight-only against float32.

What needs CUDA (float8, nf4, group offload, --max-vram on a node) is tested here through its
checks and the pure chooser, with the device described rather than present.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from denoiser_node import fit
from denoiser_node.fit import (
    GGUF,
    GROUP,
    PLAIN,
    DenoiserSize,
    DeviceCaps,
    FitOptions,
    FitPlan,
    choose,
    denoiser_size,
    plan,
    weight_bytes,
)
from protocol.stages import DENOISER
from tests.family_parity import request_spec
from triptych.families import family_for_pipeline
from triptych.families.loading import load_stage, read_model_index
from triptych.node_runner import NodeContext, NodeStartError, add_common_arguments, resolve_device

GGUF_ATOL = 1e-5  # denoised latents, GGUF Q8_0 file against the same weights dequantized, fp32 on CPU
INT8WO_MIN_PSNR = 40.0  # dB, int8 weight-only image against float32's (8-bit pixels); 58 dB measured on tiny FLUX.1

CPU = DeviceCaps("cpu", torchao=True, bitsandbytes=True, gguf=True)
H100 = DeviceCaps("cuda", (9, 0), "NVIDIA H100", torchao=True, bitsandbytes=True, gguf=True)
A100 = DeviceCaps("cuda", (8, 0), "NVIDIA A100", torchao=True, bitsandbytes=True, gguf=True)
H100_NO_BNB = DeviceCaps("cuda", (9, 0), "NVIDIA H100", torchao=True, bitsandbytes=False, gguf=True)

# black-forest-labs/FLUX.1-dev's transformer/config.json
FLUX_DEV_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

# A FLUX.1-dev-sized denoiser in bfloat16: 11.9B parameters, almost all in Linear weights.
GiB = 2**30
FLUXLIKE = DenoiserSize(
    linear_weights=11_800_000_000,
    linear_rows=2_000_000,
    other=100_000_000,
    outside_blocks=200_000_000,
    largest_block=340_000_000,
    element_size=2,
)


# --- the chooser: a pure function --------------------------------------------------------------


def test_weight_bytes_per_setting():
    assert weight_bytes(PLAIN, FLUXLIKE) == 11_900_000_000 * 2
    assert weight_bytes("int8wo", FLUXLIKE) == 11_800_000_000 + 2_000_000 * 4 + 100_000_000 * 2
    assert weight_bytes("float8wo", FLUXLIKE) == weight_bytes("int8wo", FLUXLIKE)
    assert weight_bytes("nf4", FLUXLIKE) == 5_900_000_000 + 4 * 184_375_000 + 200_000_000
    assert weight_bytes(GROUP, FLUXLIKE) == (200_000_000 + 2 * 340_000_000) * 2


@pytest.mark.parametrize(
    ("max_vram", "caps", "expected"),
    [
        (80, H100, PLAIN),  # 22.2 GiB + 3 fits
        (24, H100, "int8wo"),  # bfloat16 needs 25.2
        (16, H100, "int8wo"),  # int8 needs 14.2
        (16, A100, "int8wo"),  # float8 could not run, and int8 comes first anyway
        (12, H100, "nf4"),  # nf4 needs 9.4
        (12, H100_NO_BNB, GROUP),  # nf4 needs bitsandbytes: group offload, 4.6 GiB
        (5, H100, GROUP),
    ],
)
def test_the_least_lossy_setting_that_fits_is_chosen(max_vram, caps, expected):
    assert choose(FLUXLIKE, caps, max_vram, margin_gib=3.0).setting == expected


def test_nothing_fitting_names_every_setting_and_the_margin():
    with pytest.raises(NodeStartError) as error:
        choose(FLUXLIKE, H100_NO_BNB, 4, margin_gib=3.0)
    message = str(error.value)
    assert message.startswith("--max-vram 4: nothing fits")
    for words in (
        "unquantized needs 25.2 GiB",
        "int8wo needs 14.2 GiB",
        "group offload needs 4.6 GiB",
        "3 GiB activation",
    ):
        assert words in message, message
    assert "pip install bitsandbytes" in message  # why nf4 was not an option


def test_the_margin_moves_the_choice():
    assert choose(FLUXLIKE, H100, 24, margin_gib=1.0).setting == PLAIN
    assert choose(FLUXLIKE, H100, 24, margin_gib=3.0).setting == "int8wo"


def test_a_named_setting_is_checked_against_the_budget():
    options = FitOptions(quantize="int8wo", max_vram_gib=12)
    with pytest.raises(NodeStartError, match=r"--max-vram 12: nothing fits: int8wo needs 14\.2 GiB"):
        plan(options, H100, FLUXLIKE)
    chosen = plan(FitOptions(quantize="int8wo", max_vram_gib=16), H100, FLUXLIKE)
    assert chosen.setting == "int8wo"
    assert chosen.info(torch.bfloat16) == {"fit": "int8wo", "vram_estimate_gib": 14.18, "max_vram_gib": 16}


def test_a_gguf_file_is_measured_by_its_tensor_bytes():
    size = dataclasses.replace(FLUXLIKE, gguf_bytes=12 * GiB)  # a Q8_0 FLUX.1-dev file is about that
    options = FitOptions(denoiser_file=Path("flux1-dev-Q8_0.gguf"), max_vram_gib=16)
    chosen = plan(options, H100, size)
    assert (chosen.setting, chosen.estimate.need_gib) == (GGUF, 15.0)
    assert chosen.info(torch.bfloat16)["denoiser_file"] == "flux1-dev-Q8_0.gguf"
    with pytest.raises(NodeStartError, match=r"GGUF file needs 15\.0 GiB"):
        plan(dataclasses.replace(options, max_vram_gib=14), H100, size)


def test_the_plain_setting_is_the_dtype_in_the_nodes_info():
    assert plan(FitOptions(), CPU).info(torch.float32) == {"fit": "float32"}
    assert plan(FitOptions(max_vram_gib=80), H100, FLUXLIKE).info(torch.bfloat16)["fit"] == "bfloat16"


def test_the_size_is_counted_from_the_config_on_the_meta_device(tmp_path):
    """FLUX.1-dev's published config: 11.9B parameters, nothing allocated."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    config = {"_class_name": "FluxTransformer2DModel", **FLUX_DEV_CONFIG}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    family = family_for_pipeline("FluxPipeline")
    size = denoiser_size(str(tmp_path), family, torch.bfloat16)
    assert 11.8e9 < size.total < 12.0e9
    assert size.linear_weights > 0.99 * size.total
    assert 22.0 < weight_bytes(PLAIN, size) / GiB < 22.4
    assert 1.3 < weight_bytes(GROUP, size) / GiB < 1.5  # the largest of 57 blocks twice (0.63 GiB each), the rest


@pytest.mark.parametrize("name", ["flux", "sd", "sdxl", "sd3", "sana", "qwenimage", "zimage", "flux2"])
def test_the_estimate_is_the_loaded_models_bytes(family_checkpoint, name):
    path = family_checkpoint(name)
    family = family_for_pipeline(read_model_index(str(path))["_class_name"])
    size = denoiser_size(str(path), family, torch.float32)
    module = getattr(load_stage(str(path), DENOISER).pipe, family.denoiser_attr)
    assert weight_bytes(PLAIN, size) == sum(t.numel() * 4 for t in [*module.parameters(), *module.buffers()])
    linear = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert (size.linear_weights, size.linear_rows) == (sum(w.numel() for w in linear), sum(len(w) for w in linear))
    if name == "flux":
        blocks = [*module.transformer_blocks, *module.single_transformer_blocks]
        assert size.largest_block == max(sum(p.numel() for p in block.parameters()) for block in blocks)


# --- each flag's error paths ------------------------------------------------------------------


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fit.add_fit_arguments(parser)
    return parser.parse_args(list(flags))


@pytest.mark.parametrize(
    ("flags", "caps", "message"),
    [
        (["--quantize", "nf4"], CPU, "--quantize nf4 runs on CUDA GPUs only"),
        (["--quantize", "nf4"], H100_NO_BNB, "--quantize nf4 needs bitsandbytes: pip install bitsandbytes"),
        (["--quantize", "float8wo"], CPU, "--quantize float8wo needs a CUDA GPU of compute capability 8.9"),
        (["--quantize", "float8wo"], A100, "NVIDIA A100 has 8.0: use int8wo"),
        (["--offload", "group"], CPU, "this denoiser runs on cpu, where it means nothing"),
        (["--max-vram", "8"], CPU, "--max-vram limits GPU memory; this denoiser runs on cpu"),
        (
            ["--quantize", "int8wo"],
            DeviceCaps("cpu"),
            "--quantize int8wo needs torchao: pip install torchao",
        ),
    ],
)
def test_settings_the_device_cannot_run_are_clear_errors(flags, caps, message):
    with pytest.raises(NodeStartError, match=message):
        plan(FitOptions.from_args(_args(*flags)), caps, FLUXLIKE)


@pytest.mark.parametrize(
    ("flags", "caps", "setting"),
    [
        (["--quantize", "int8wo"], CPU, "int8wo"),
        (["--quantize", "float8wo"], H100, "float8wo"),
        (["--quantize", "nf4"], H100, "nf4"),
        (["--offload", "group"], H100, GROUP),
        ([], CPU, PLAIN),
    ],
)
def test_settings_the_device_runs(flags, caps, setting):
    assert plan(FitOptions.from_args(_args(*flags)), caps).setting == setting


@pytest.mark.parametrize("flags", [["--quantize", "int4"], ["--offload", "model"]])
def test_an_unknown_kind_is_refused_by_the_flag(flags, capsys):
    with pytest.raises(SystemExit):
        _args(*flags)
    assert f"{flags[0]}: invalid choice: {flags[1]!r}" in capsys.readouterr().err


def test_an_unknown_kind_is_refused_without_the_parser_too():
    args = argparse.Namespace(quantize="int4", offload=None, denoiser_file=None, max_vram=None, vram_margin=3.0)
    with pytest.raises(NodeStartError, match=r"--quantize: unknown kind 'int4'; choose from int8wo"):
        FitOptions.from_args(args)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize", "int8wo", "--offload", "group"], "choose one"),
        (["--max-vram", "0"], "--max-vram must be a positive number"),
        (["--max-vram", "nan"], "--max-vram must be a positive number"),
        (["--vram-margin", "-1"], "--vram-margin must be 0 or more"),
    ],
)
def test_bad_combinations_and_values_are_clear_errors(flags, message):
    with pytest.raises(NodeStartError, match=message):
        FitOptions.from_args(_args(*flags))


def test_a_missing_or_non_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(NodeStartError, match=r"--denoiser-file: no such file: .*missing\.gguf"):
        FitOptions.from_args(_args("--denoiser-file", str(tmp_path / "missing.gguf")))
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    with pytest.raises(NodeStartError, match=r"is not a GGUF file \(it starts with b'PK\\x03\\x04'"):
        FitOptions.from_args(_args("--denoiser-file", str(fake)))
    with pytest.raises(NodeStartError, match="already quantized"):
        FitOptions.from_args(_args("--denoiser-file", str(fake), "--quantize", "int8wo"))


def test_a_gguf_file_for_a_class_the_single_file_loader_lacks_is_refused(family_checkpoint, tmp_path):
    gguf_file = tmp_path / "t.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(
        NodeStartError, match=r"cannot load a PixArtTransformer2DModel \(pixart-alpha\).*FluxTransformer"
    ):
        _denoiser(family_checkpoint("pixart-alpha"), "--denoiser-file", str(gguf_file))


def test_fused_qkv_projections_with_quantized_weights_are_refused(family_checkpoint):
    with pytest.raises(NodeStartError, match="--fuse-qkv cannot fuse the weights of int8wo"):
        _denoiser(family_checkpoint("flux"), "--quantize", "int8wo", "--fuse-qkv")


def test_the_node_refuses_to_start_without_cuda(family_checkpoint):
    with pytest.raises(NodeStartError, match="runs on CUDA GPUs only"):
        _denoiser(family_checkpoint("flux"), "--quantize", "nf4")
    with pytest.raises(NodeStartError, match="sees no CUDA device"):
        _denoiser(family_checkpoint("flux"), "--quantize", "nf4", "--device", "cuda")


# --- the node with a GGUF file and with int8 weight-only ----------------------------------------


def module_family(path: Path):
    return family_for_pipeline(read_model_index(str(path))["_class_name"])


def _denoiser(path: Path, *flags: str):
    """The denoiser node's own build, from its command line, on a tiny checkpoint."""
    from denoiser_node.main import add_arguments, build

    parser = argparse.ArgumentParser()
    add_common_arguments(parser, DENOISER)
    add_arguments(parser)
    args = parser.parse_args(["--model", str(path), "--device", "cpu", *flags])
    family = family_for_pipeline(read_model_index(str(path))["_class_name"])
    device, dtype = resolve_device(DENOISER, args.device, args.dtype, family.cuda_dtype)
    return build(NodeContext(args, DENOISER, family, device, dtype, path.name))


def write_q8_gguf(module: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """``module``'s weights as a GGUF file, Q8_0 where rows split into blocks of 32, else F32.

    The names are diffusers' own, which the single-file loader takes as they are when they match
    the model's. (Files of the original FLUX.1 release use Black Forest Labs' names, converted by
    the loader's FLUX mapping, which assumes the full model's width of 3072: no tiny model fits it.)
    Returns the weights as diffusers dequantizes them: block scale times int8 in float16.
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    writer = GGUFWriter(str(path), "flux")
    reference = {}
    for name, tensor in module.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim >= 2 and array.shape[-1] % 32 == 0:
            data = quantize(array, GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType.Q8_0)
            restored = dequantize(data, GGMLQuantizationType.Q8_0).reshape(array.shape).astype(np.float16)
            reference[name] = torch.from_numpy(restored.astype(np.float32))
        else:
            writer.add_tensor(name, array)
            reference[name] = tensor.float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _denoised(stage, request) -> torch.Tensor:
    family, pipe = stage.family, stage.pipe
    with torch.inference_mode():
        [(latents, _)] = family.denoise(pipe, [(_EMBEDS[request.prompt], request)], lambda step, total: None)
    return latents


_EMBEDS: dict[str, dict[str, torch.Tensor]] = {}


def test_a_gguf_file_matches_its_dequantized_weights(family_checkpoint, tmp_path):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = family_checkpoint("flux")
    family = family_for_pipeline("FluxPipeline")
    plain = load_stage(str(path), DENOISER)
    reference = write_q8_gguf(plain.pipe.transformer, tmp_path / "flux-Q8_0.gguf")
    encoder = load_stage(str(path), "encoder")
    request = request_spec(path.name, prompt="a red fox in the snow", steps=3, height=64, width=64)
    with torch.inference_mode():
        _EMBEDS[request.prompt] = family.encode(encoder.pipe, request)
    original = _denoised(plain, request)

    node = _denoiser(path, "--denoiser-file", str(tmp_path / "flux-Q8_0.gguf"))
    assert node.info["fit"] == "GGUF file"
    assert node.info["denoiser_file"] == "flux-Q8_0.gguf"
    weight = node.handler.stage.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, GGUFParameter) and weight.quant_type.name == "Q8_0"

    plain.pipe.transformer.load_state_dict(reference)  # the file's weights, dequantized
    expected = _denoised(plain, request)
    got = _denoised(node.handler.stage, request)
    assert (got - expected).abs().max().item() <= GGUF_ATOL
    assert (got - original).abs().max().item() > 10 * GGUF_ATOL  # the file did hold quantized weights


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_int8_weight_only_stays_close_to_float32(family_checkpoint):
    from diffusers import FluxPipeline

    path = family_checkpoint("flux")
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)

    def image() -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(0)
        out = pipe("a red fox in the snow", num_inference_steps=4, height=64, width=64, generator=generator)
        return np.asarray(out.images[0])

    exact = image()
    node = _denoiser(path, "--quantize", "int8wo")
    assert node.info["fit"] == "int8wo"
    pipe.transformer = node.handler.stage.pipe.transformer
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    quantized = image()
    psnr = _psnr(exact, quantized)
    assert psnr >= INT8WO_MIN_PSNR, psnr
    assert not np.array_equal(exact, quantized)  # it did quantize


def test_a_denoiser_loader_is_used_only_for_the_denoiser(family_checkpoint):
    path = family_checkpoint("flux")
    calls = []

    def loader(model, family, device, dtype):
        calls.append((model, family.name, device, dtype))
        return fit.load_denoiser(FitPlan("int8wo", FitOptions(quantize="int8wo")), model, family, device, dtype)

    stage = load_stage(str(path), DENOISER, denoiser=loader)
    assert calls == [(str(path), "flux", "cpu", torch.float32)]
    module = stage.pipe.transformer
    assert type(module.proj_out.weight).__name__ == "Int8Tensor"
    stored = 0  # torchao's tensors hold int8 data and float32 scales (tensor_data_names)
    for t in [*module.parameters(), *module.buffers()]:
        parts = [getattr(t, name) for name in getattr(t, "tensor_data_names", ())] or [t]
        stored += sum(part.numel() * part.element_size() for part in parts)
    assert stored == weight_bytes("int8wo", denoiser_size(str(path), module_family(path), torch.float32))
    assert fit.denoiser_loader(FitPlan(PLAIN, FitOptions())) is None
    assert fit.denoiser_loader(FitPlan(GGUF, FitOptions())) is not None


# --- with LoRA adapters -------------------------------------------------------------------------


def test_with_adapters_the_chooser_skips_the_settings_that_cannot_take_them():
    assert choose(FLUXLIKE, H100, 16, loras=True).setting == "nf4"  # int8wo and float8wo refuse adapters
    with pytest.raises(NodeStartError, match=r"group offload needs 4\.6 GiB \(and cannot run: --offload group cannot"):
        choose(FLUXLIKE, H100, 8, loras=True)


def test_adapters_with_torchao_weights_are_refused_at_start(family_checkpoint, tmp_path):
    with pytest.raises(NodeStartError, match="--quantize int8wo cannot take the LoRA adapters of --lora-dir"):
        _denoiser(family_checkpoint("flux"), "--quantize", "int8wo", "--lora-dir", str(tmp_path))


def test_a_gguf_denoiser_takes_adapters(family_checkpoint, tmp_path):
    from protocol.messages import DenoiseJob
    from tests.family_parity import wire
    from tests.test_lora import make_lora

    path = family_checkpoint("flux")
    make_lora(path, tmp_path / "loras", "ink", seed=1)
    write_q8_gguf(load_stage(str(path), DENOISER).pipe.transformer, tmp_path / "flux-Q8_0.gguf")
    node = _denoiser(path, "--denoiser-file", str(tmp_path / "flux-Q8_0.gguf"), "--lora-dir", str(tmp_path / "loras"))
    encoder = load_stage(str(path), "encoder")
    latents = []
    for loras in ({}, {"ink": 1.0}):
        request = request_spec(path.name, prompt="a fox", steps=2, height=64, width=64, loras=loras)
        with torch.inference_mode():
            embeds = encoder.family.encode(encoder.pipe, request)
        job = wire(DenoiseJob(job_id="d", request_id="r", request=request, embeds=embeds))
        [result] = node.handler([job], lambda *args, **kwargs: None)
        latents.append(wire(result).latents)
    assert (latents[0] - latents[1]).abs().max().item() > 1e-3  # the adapter reached the GGUF layers
