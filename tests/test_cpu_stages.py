"""The CPU stages' speed options: the encoder's ``--dtype auto`` and ``--quantize int8``, the decoder's
``--dtype bfloat16``, ``--compile`` and ``--channels-last``, each against float32 on tiny checkpoints;
and the seconds per image that `triptych status` and the metrics show per stage."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch

from encoder_node import precision
from encoder_node.precision import BFLOAT16_MIN_PARAMETERS, auto_dtype, choose_dtypes, cpu_flags, quantize_int8
from protocol.messages import StatusReply
from protocol.metrics import PrometheusMetrics
from protocol.stages import DECODER, DENOISER, ENCODER
from tests.family_parity import request_spec
from triptych.node_runner import BusyTime, NodeContext, NodeStartError, add_common_arguments, resolve_device
from triptych.status import format_status, seconds_per_image

BF16_CPU = frozenset({"fpu", "avx512f", "avx512_bf16"})
AMX_CPU = frozenset({"fpu", "amx_bf16", "amx_tile"})
PLAIN_CPU = frozenset({"fpu", "avx2", "avx512f"})

INT8_MIN_COSINE = 0.99  # each token's embedding, int8 T5 against float32
BF16_MIN_PSNR = 40.0  # dB, decoded image against float32's (8-bit pixels); 49 dB measured
CHANNELS_LAST_MIN_PSNR = 50.0  # the same arithmetic in another layout: equal images measured
COMPILE_MIN_PSNR = 40.0


# --- the encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "device", "flags", "expected"),
    [
        (BFLOAT16_MIN_PARAMETERS, "cpu", BF16_CPU, torch.bfloat16),  # T5-XXL-sized and up
        (4_762_000_000, "cpu", AMX_CPU, torch.bfloat16),
        (BFLOAT16_MIN_PARAMETERS - 1, "cpu", BF16_CPU, torch.float32),  # the CLIPs
        (123_000_000, "cpu", BF16_CPU, torch.float32),
        (4_762_000_000, "cpu", PLAIN_CPU, torch.float32),  # emulated bfloat16 is slower, not faster
        (4_762_000_000, "cpu", frozenset(), torch.float32),
        (4_762_000_000, "cuda", BF16_CPU, torch.float32),  # only a CPU choice
    ],
)
def test_auto_dtype_is_a_function_of_size_device_and_cpu_flags(parameters, device, flags, expected):
    assert auto_dtype(parameters, device, flags) == expected


def test_auto_dtype_is_chosen_per_text_encoder():
    sizes = {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "text_encoder_3": None}
    assert choose_dtypes(sizes, "cpu", BF16_CPU) == {
        "default": torch.float32,
        "text_encoder": torch.float32,
        "text_encoder_2": torch.bfloat16,
        "text_encoder_3": torch.float32,  # its size could not be read: the exact choice
    }


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n\n")
    assert cpu_flags(cpuinfo) >= {"avx512_bf16", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def _built_node(service: str, path, *flags: str):
    """A node's own build, from its command line, on a tiny checkpoint."""
    from importlib import import_module

    from triptych.families import family_for_pipeline
    from triptych.families.loading import read_model_index
    from triptych.nodes import ENTRY_POINTS

    main = import_module(ENTRY_POINTS[service].split(":")[0])
    parser = argparse.ArgumentParser()
    add_common_arguments(parser, service)
    main.add_arguments(parser)
    args = parser.parse_args(["--model", str(path), *flags])
    family = family_for_pipeline(read_model_index(str(path))["_class_name"])
    device, dtype = resolve_device(service, args.device, args.dtype, family.cuda_dtype)
    return main.build(NodeContext(args, service, family, device, dtype, path.name))


def _encoder(path, *flags: str):
    return _built_node(ENCODER, path, *flags)


def _embeds(node, path, prompt: str = "a red fox in the snow") -> dict[str, torch.Tensor]:
    job = type("Job", (), {"request": request_spec(path.name, prompt=prompt), "job_id": "j"})()
    with torch.inference_mode():
        return node.handler._encode(job).embeds


def test_auto_runs_large_encoders_in_bfloat16_on_a_bfloat16_cpu(family_checkpoint, monkeypatch, caplog):
    path = family_checkpoint("flux")  # CLIP-L (pooled) + T5
    t5_size = precision.parameter_count(str(path), "text_encoder_2", "T5EncoderModel")
    clip_size = precision.parameter_count(str(path), "text_encoder", "CLIPTextModel")
    assert t5_size < clip_size  # in the tiny checkpoint the CLIP is the larger one
    # A threshold between the two stands in for 1B between the CLIPs and T5-XXL.
    monkeypatch.setattr(precision, "BFLOAT16_MIN_PARAMETERS", clip_size)
    monkeypatch.setattr(precision, "cpu_flags", lambda: BF16_CPU)
    with caplog.at_level(logging.INFO, logger="encoder_node.main"):
        node = _encoder(path)
    pipe = node.handler.stage.pipe
    assert (pipe.text_encoder.dtype, pipe.text_encoder_2.dtype) == (torch.bfloat16, torch.float32)
    assert node.info["text_encoders"] == "text_encoder=bfloat16 text_encoder_2=float32"
    assert "--dtype auto: text_encoder bfloat16" in caplog.text and "avx512_bf16" in caplog.text
    embeds = _embeds(node, path)
    assert embeds["pooled_prompt_embeds"].dtype == torch.bfloat16  # the pipeline casts to each encoder's dtype
    assert embeds["prompt_embeds"].dtype == torch.float32

    monkeypatch.setattr(precision, "cpu_flags", lambda: PLAIN_CPU)
    pipe = _encoder(path).handler.stage.pipe
    assert pipe.text_encoder.dtype == torch.float32


def test_an_explicit_float32_stays_exact_on_a_bfloat16_cpu(family_checkpoint, monkeypatch):
    path = family_checkpoint("pixart-alpha")
    monkeypatch.setattr(precision, "BFLOAT16_MIN_PARAMETERS", 1)
    monkeypatch.setattr(precision, "cpu_flags", lambda: BF16_CPU)
    node = _encoder(path, "--dtype", "float32")
    pipe = node.handler.stage.pipe
    assert pipe.text_encoder.dtype == torch.float32
    embeds = _embeds(node, path)
    from diffusers import DiffusionPipeline

    reference = DiffusionPipeline.from_pretrained(path)
    with torch.inference_mode():
        expected, *_ = reference.encode_prompt("a red fox in the snow", do_classifier_free_guidance=False)
    assert torch.equal(embeds["prompt_embeds"], expected)


def test_int8_t5_embeddings_stay_close_to_float32(family_checkpoint):
    path = family_checkpoint("pixart-alpha")  # a tiny T5 encoder
    exact, quantized = _encoder(path, "--dtype", "float32"), _encoder(path, "--quantize", "int8")
    linear = quantized.handler.stage.pipe.text_encoder.encoder.block[0].layer[1].DenseReluDense.wi_0
    assert type(linear).__module__.startswith("torch.ao.nn.quantized.dynamic")
    kept = quantized.handler.stage.pipe.text_encoder.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.bfloat16  # the heavy-tailed input's layer
    assert quantized.info["text_encoders"] == "text_encoder=int8"
    for prompt in ("a red fox in the snow", "a lighthouse on a cliff at dusk, oil painting"):
        a, b = _embeds(exact, path, prompt)["prompt_embeds"], _embeds(quantized, path, prompt)["prompt_embeds"]
        assert b.dtype == torch.float32 and a.shape == b.shape
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # (1, tokens)
        assert cosine.min().item() >= INT8_MIN_COSINE, cosine
        assert not torch.equal(a, b)  # it did quantize


def test_quantize_int8_replaces_every_linear_layer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    x = torch.randn(3, 8)
    reference = model.float()(x)
    model = model.to(torch.bfloat16)
    assert quantize_int8(model) == 2
    assert all(not isinstance(m, torch.nn.Linear) or type(m) is not torch.nn.Linear for m in model.modules())
    assert torch.nn.functional.cosine_similarity(model(x), reference, dim=-1).min() > 0.98


@pytest.mark.parametrize(
    ("family", "flags", "message"),
    [
        ("pixart-alpha", ["--quantize", "int8", "--dtype", "bfloat16"], "use --dtype auto or float32"),
        ("pixart-alpha", ["--quantize", "int8", "--device", "cuda"], "CPU only"),
        ("pixart-alpha", ["--quantize", "int8", "--lora-dir", "loras"], "--lora-dir"),
        ("sd", ["--quantize", "int8"], "no T5 or LLM text encoder"),
        ("sd3", ["--quantize", "int8", "--no-t5"], "no T5 or LLM text encoder"),  # its only T5 left out
    ],
)
def test_bad_encoder_combinations_are_clear_errors(family_checkpoint, family, flags, message):
    with pytest.raises(NodeStartError, match=message):
        _encoder(family_checkpoint(family), *flags)


def test_an_unknown_quantization_is_refused_by_the_flag(family_checkpoint, capsys):
    with pytest.raises(SystemExit):
        _encoder(family_checkpoint("pixart-alpha"), "--quantize", "int4")
    assert "--quantize: invalid choice: 'int4'" in capsys.readouterr().err


# --- the decoder ---------------------------------------------------------------------------


def _decoder(path, *flags: str):
    return _built_node(DECODER, path, *flags)


def _decoded(node, latents: torch.Tensor) -> np.ndarray:
    from triptych.families.loading import load_stage

    stage = node.handler.stage
    denoiser = load_stage(node.handler.stage.pipe.name_or_path, DENOISER)  # the params come from the denoiser
    params = stage.family.resolve_params(denoiser.pipe, request_spec("m", prompt="x", height=64, width=64))
    with torch.inference_mode():
        (image,) = stage.family.decode(stage.pipe, latents, params)
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def sd_latents() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))  # a 64 x 64 image


@pytest.mark.parametrize(
    ("flags", "bound"),
    [
        (["--dtype", "bfloat16"], BF16_MIN_PSNR),
        (["--channels-last"], CHANNELS_LAST_MIN_PSNR),
        (["--dtype", "bfloat16", "--channels-last"], BF16_MIN_PSNR),
        (["--compile"], COMPILE_MIN_PSNR),
    ],
)
def test_each_decoder_option_stays_within_its_psnr_of_float32(family_checkpoint, sd_latents, flags, bound):
    path = family_checkpoint("sd")
    reference = _decoded(_decoder(path), sd_latents)
    node = _decoder(path, *flags)
    vae = node.handler.stage.pipe.vae
    if "bfloat16" in flags:
        assert vae.dtype == torch.bfloat16
    if "--channels-last" in flags:
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    if "--compile" in flags:
        assert type(vae.decoder).__name__ == "OptimizedModule" and node.info["compile"] == "default"
    image = _decoded(node, sd_latents)
    assert image.shape == reference.shape
    assert psnr(image, reference) >= bound


def test_the_default_decoder_stays_float32(family_checkpoint):
    node = _decoder(family_checkpoint("sd"))
    vae = node.handler.stage.pipe.vae
    assert vae.dtype == torch.float32 and type(vae.decoder).__name__ != "OptimizedModule"
    assert node.info["dtype"] == "float32" and "compile" not in node.info


def test_bad_decoder_combinations_are_clear_errors(family_checkpoint, monkeypatch):
    with pytest.raises(NodeStartError, match="3-D convolutions"):
        _decoder(family_checkpoint("qwenimage"), "--channels-last")  # the Wan VAE is video-shaped
    with pytest.raises(NodeStartError, match="float16 is not supported on the CPU"):
        _decoder(family_checkpoint("sd"), "--dtype", "float16")
    monkeypatch.setattr("decoder_node.main.shutil.which", lambda name: None)
    with pytest.raises(NodeStartError, match="needs a C\\+\\+ compiler"):
        _decoder(family_checkpoint("sd"), "--compile")


# --- seconds per image in status and metrics -------------------------------------------------


def test_a_node_counts_its_busy_seconds():
    busy = BusyTime(lambda jobs, progress: [len(jobs)], lambda: {"images": 3})
    assert busy([1, 2], None) == [2]
    stats = busy.stats()
    assert stats["images"] == 3 and stats["busy_seconds"] >= 0


def _node(service: str, node: str, images: int, busy: float) -> dict:
    return {
        "service": service,
        "model": "m",
        "node": node,
        "state": "idle",
        "jobs_in_progress": 0,
        "jobs_done": images,
        "last_heartbeat_s": 0.1,
        "info": {},
        "stats": {"images": images, "busy_seconds": busy},
    }


def test_status_shows_each_stage_seconds_per_image():
    nodes = [
        _node("encoder", "c:1", 10, 0.5),
        _node("denoiser", "b:2", 10, 30.0),
        _node("decoder", "c:3", 10, 40.0),
        _node("decoder", "c:4", 0, 0.0),  # has made nothing yet
    ]
    reply = StatusReply(request_id="s", nodes=nodes, queues={}, requests_in_flight=0)
    assert seconds_per_image(nodes[2]) == 4.0 and seconds_per_image(nodes[3]) is None
    text = format_status(reply)
    header, *rows = text.splitlines()[:5]
    assert "S/IMAGE" in header
    assert rows[0].split()[-1] == "0.05" and rows[2].split()[-1] == "4.00" and rows[3].split()[-1] == "-"
    # Per stage: node-seconds per image, and images per second with the nodes there are.
    assert "decoder   m      2      4.00     0.50" in text
    assert "denoiser  m      1      3.00     0.33" in text


def test_metrics_show_each_stage_seconds_per_image():
    from prometheus_client import generate_latest

    metrics = PrometheusMetrics()
    workers = [type("W", (), {"service": s, "model": "m"})() for s in ("encoder", "decoder")]
    metrics.on_tick(workers, {}, 0)
    metrics.on_node_stats("decoder", "m", "c:3", {"images": 10, "busy_seconds": 40.0})
    metrics.on_node_stats("decoder", "m", "c:4", {"images": 10, "busy_seconds": 20.0})
    metrics.on_node_stats("encoder", "m", "c:1", {"images": 0, "busy_seconds": 0.0})
    text = generate_latest(metrics.registry).decode()
    assert 'triptych_stage_seconds_per_image{model="m",service="decoder"} 3.0' in text
    assert 'triptych_stage_seconds_per_image{model="m",service="encoder"}' not in text  # no image yet
