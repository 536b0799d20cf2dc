"""LoRA adapters: each node loads its part of an adapter file, and the images equal diffusers' own
``load_lora_weights`` + ``set_adapters`` on the whole pipeline, alone or in a batch with others."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from decoder_node.png import encode_png, read_metadata
from denoiser_node.handler import DenoiserHandler
from encoder_node.handler import EncoderHandler
from protocol.errors import RequestError
from protocol.messages import DecodeJob, DenoiseJob, EncodeJob, GenerateRequest
from protocol.stages import DECODER, DENOISER, ENCODER
from protocol.validation import request_error
from tests.family_parity import max_difference, request_spec, wire
from triptych.families.loading import LoadedStage, load_stage
from triptych.families.lora import TEXT_ENCODERS, LoraAdapters, LoraFolder, installed_peft_accepted

PROMPT = "a lighthouse on a cliff"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # UNet and DiT attention projections
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# family -> the denoiser attribute, the text encoders whose LoRA layers diffusers loads, image options
FAMILIES = {
    "sd": ("unet", ("text_encoder",), {"height": 64, "width": 64, "guidance": 5.0}),
    "sdxl": ("unet", ("text_encoder", "text_encoder_2"), {"height": 64, "width": 64, "guidance": 5.0}),
    "flux": ("transformer", ("text_encoder",), {"height": 64, "width": 64, "guidance": 3.0}),
    "sd3": ("transformer", (), {"height": 64, "width": 64, "guidance": 5.0}),
}


def make_lora(checkpoint: Path, folder: Path, name: str, seed: int, text_encoders: tuple[str, ...] = ()) -> Path:
    """A random rank-4 LoRA of the checkpoint's denoiser (and text encoders) saved as diffusers does.

    lora_B is random too (PEFT's ``init_lora_weights=False``), so the adapter changes the image.
    """
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(checkpoint)
    attr = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    layers = {}
    torch.manual_seed(seed)
    for part, targets in [(attr, ATTENTION), *((te, CLIP_ATTENTION) for te in text_encoders)]:
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        module = inject_adapter_in_model(config, getattr(pipe, part))
        state = get_peft_model_state_dict(module)
        layers[f"{part}_lora_layers"] = {key: value * 1.5 for key, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder, weight_name=f"{name}.safetensors", **layers)
    return folder / f"{name}.safetensors"


_REFERENCES: dict[tuple[Path, Path], Any] = {}


def reference(checkpoint: Path, folder: Path, loras: dict[str, float], seed: int, **kwargs) -> Image.Image:
    """diffusers' own way: the whole pipeline, load_lora_weights per adapter, then set_adapters
    (disable_lora for none). One pipeline per folder, each adapter loaded into it once."""
    from diffusers import DiffusionPipeline

    if (checkpoint, folder) not in _REFERENCES:
        pipe = DiffusionPipeline.from_pretrained(checkpoint)
        pipe.set_progress_bar_config(disable=True)
        _REFERENCES[checkpoint, folder] = pipe
    pipe = _REFERENCES[checkpoint, folder]
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    with installed_peft_accepted():
        for name in loras:
            if _peft_name(name) not in loaded:
                pipe.load_lora_weights(folder, weight_name=f"{name}.safetensors", adapter_name=_peft_name(name))
    if loras:
        pipe.enable_lora()
        pipe.set_adapters([_peft_name(name) for name in loras], list(loras.values()))
    elif loaded:
        pipe.disable_lora()
    return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def _peft_name(name: str) -> str:
    """PEFT adapter names hold no '.', file names may."""
    return name.replace(".", "_")


def reference_kwargs(options: dict, steps: int = 3) -> dict:
    names = {"guidance": "guidance_scale", "height": "height", "width": "width", "negative_prompt": "negative_prompt"}
    return {"prompt": PROMPT, "num_inference_steps": steps, **{names[k]: v for k, v in options.items()}}


class Nodes:
    """The three stages of one checkpoint in this process, their own copies (adapters go into their modules)."""

    def __init__(self, checkpoint: Path, folder: Path | None, max_bytes: int = 1 << 30) -> None:
        self.encoder, self.denoiser, self.decoder = (
            load_stage(str(checkpoint), service) for service in (ENCODER, DENOISER, DECODER)
        )
        attr = self.denoiser.family.denoiser_attr
        self.encoder_adapters = self.denoiser_adapters = None
        if folder is not None:
            self.encoder_adapters = LoraAdapters(self.encoder.pipe, LoraFolder(folder), max_bytes, TEXT_ENCODERS)
            self.denoiser_adapters = LoraAdapters(self.denoiser.pipe, LoraFolder(folder), max_bytes, (attr,))
        self.encode_handler = EncoderHandler(self.encoder, adapters=self.encoder_adapters)
        self.denoise_handler = DenoiserHandler(self.denoiser, self.denoiser_adapters)

    def embeds(self, request) -> dict:
        [embeddings] = self.encode_handler([wire(EncodeJob(job_id="e", request_id="r", request=request))], None)
        return wire(embeddings).embeds

    def decode(self, latents: torch.Tensor, params, index: int = 0) -> Image.Image:
        job = wire(
            DecodeJob(job_id="x", request_id="r", params=params, index=index, latents=latents[index : index + 1])
        )
        with torch.inference_mode():
            (image,) = self.decoder.family.decode(self.decoder.pipe, job.latents, job.params)
        return Image.open(io.BytesIO(encode_png(image, job.params, index))).convert("RGB")

    def run(self, request) -> list[Image.Image]:
        """encoder handler -> wire -> denoiser handler -> wire -> decoder, as the nodes run a request."""
        job = wire(DenoiseJob(job_id="d", request_id="r", request=request, embeds=self.embeds(request)))
        [result] = self.denoise_handler([job], lambda step, total, previews=None: None)
        denoised = wire(result)
        return [self.decode(denoised.latents, denoised.params, i) for i in range(request.num_images)]


@pytest.fixture(scope="module")
def adapters_of(family_checkpoint, tmp_path_factory):
    """Per family: its checkpoint and a folder with two adapters, "ink" and "dusk.v2" (text-encoder parts too
    where diffusers loads them)."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            checkpoint, folder = family_checkpoint(family), tmp_path_factory.mktemp(f"loras-{family}")
            text_encoders = FAMILIES[family][1]
            make_lora(checkpoint, folder, "ink", seed=1, text_encoders=text_encoders)
            make_lora(checkpoint, folder, "dusk.v2", seed=2, text_encoders=text_encoders)
            made[family] = checkpoint, folder
        return made[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_adapter_gives_diffusers_images_and_changes_them(adapters_of, family):
    checkpoint, folder = adapters_of(family)
    options = FAMILIES[family][2]
    nodes = Nodes(checkpoint, folder)
    loras = {"ink": 0.8}
    (image,) = nodes.run(request_spec(checkpoint.name, prompt=PROMPT, steps=3, seed=4, loras=loras, **options))
    expected = reference(checkpoint, folder, loras, 4, **reference_kwargs(options))
    assert max_difference(image, expected) <= 1
    plain = reference(checkpoint, folder, {}, 4, **reference_kwargs(options))
    assert max_difference(image, plain) > 4, "the adapter should change the image"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_text_encoder_part_of_an_adapter_runs_on_the_encoder(adapters_of, family):
    checkpoint, folder = adapters_of(family)
    nodes = Nodes(checkpoint, folder)
    request = request_spec(checkpoint.name, prompt=PROMPT, loras={"ink": 1.0})
    with_adapter = nodes.embeds(request)["prompt_embeds"]
    without = nodes.embeds(request_spec(checkpoint.name, prompt=PROMPT))["prompt_embeds"]
    assert not torch.allclose(with_adapter, without)
    assert nodes.encoder_adapters is not None and nodes.encoder_adapters.bytes > 0
    # The embedding cache keys on the adapters: the same text without them was a miss, with them a hit.
    cache = nodes.encode_handler.cache
    misses, hits = cache.misses, cache.hits
    assert hits == 0
    assert torch.equal(nodes.embeds(request)["prompt_embeds"], with_adapter)
    assert cache.misses == misses and cache.hits > 0


def test_two_adapters_at_once_equal_diffusers_set_adapters(adapters_of):
    checkpoint, folder = adapters_of("sdxl")
    options = FAMILIES["sdxl"][2]
    loras = {"ink": 0.6, "dusk.v2": -0.4}
    nodes = Nodes(checkpoint, folder)
    request = request_spec(checkpoint.name, prompt=PROMPT, steps=3, seed=2, num_images=2, loras=loras, **options)
    images = nodes.run(request)
    for index, image in enumerate(images):
        expected = reference(checkpoint, folder, loras, 2 + index, **reference_kwargs(options))
        assert max_difference(image, expected) <= 1, f"image {index}"


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_mixed_batch_gives_each_request_its_own_adapters(adapters_of, family):
    checkpoint, folder = adapters_of(family)
    options = FAMILIES[family][2]
    nodes = Nodes(checkpoint, folder)
    sets = [{"ink": 1.0}, {"dusk.v2": 0.7}, {}]
    requests = [
        request_spec(checkpoint.name, prompt=PROMPT, steps=3, seed=10 + i, loras=loras, **options)
        for i, loras in enumerate(sets)
    ]
    batch = [(nodes.embeds(request), request) for request in requests]
    family_code, pipe = nodes.denoiser.family, nodes.denoiser.pipe
    with torch.inference_mode():
        results = family_code.denoise(pipe, batch, lambda step, total: None, adapters=nodes.denoiser_adapters)
    keys = {family_code.batch_key(pipe, embeds, request) for embeds, request in batch}
    assert len(keys) == 3, "the node batches only requests with the same adapters"
    for i, ((latents, params), loras) in enumerate(zip(results, sets, strict=True)):
        assert params.loras == loras
        expected = reference(checkpoint, folder, loras, 10 + i, **reference_kwargs(options))
        assert max_difference(nodes.decode(latents, params), expected) <= 1, f"request {i} ({loras})"


def test_a_kohya_file_loads_as_diffusers_reads_it(adapters_of, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    checkpoint, folder = adapters_of("sd")
    peft_format = {
        key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): value
        for key, value in load_file(folder / "ink.safetensors").items()
    }
    kohya = convert_state_dict_to_kohya(peft_format)
    assert all(key.startswith(("lora_unet_", "lora_te")) for key in kohya)
    save_file(kohya, tmp_path / "ink-kohya.safetensors")
    options = FAMILIES["sd"][2]
    (image,) = Nodes(checkpoint, tmp_path).run(
        request_spec(checkpoint.name, prompt=PROMPT, steps=3, seed=4, loras={"ink-kohya": 0.8}, **options)
    )
    expected = reference(checkpoint, tmp_path, {"ink-kohya": 0.8}, 4, **reference_kwargs(options))
    assert max_difference(image, expected) <= 1


def test_the_png_records_the_adapters(adapters_of):
    checkpoint, folder = adapters_of("sd")
    nodes = Nodes(checkpoint, folder)
    request = request_spec(
        checkpoint.name, prompt=PROMPT, steps=1, seed=1, loras={"ink": 0.5, "dusk.v2": 1.0}, height=64, width=64
    )
    job = wire(DenoiseJob(job_id="d", request_id="r", request=request, embeds=nodes.embeds(request)))
    [result] = nodes.denoise_handler([job], lambda step, total, previews=None: None)
    assert list(wire(result).params.loras.items()) == [("ink", 0.5), ("dusk.v2", 1.0)]  # the request's order
    with torch.inference_mode():
        (image,) = nodes.decoder.family.decode(nodes.decoder.pipe, result.latents, result.params)
    assert read_metadata(encode_png(image, result.params))["loras"] == "ink:0.5,dusk.v2:1"


def test_an_unknown_adapter_is_refused_listing_the_folder(adapters_of):
    checkpoint, folder = adapters_of("sd")
    nodes = Nodes(checkpoint, folder)
    request = request_spec(checkpoint.name, prompt=PROMPT, steps=1, loras={"nope": 1.0}, height=64, width=64)
    with pytest.raises(
        RequestError, match=r"unknown LoRA adapter 'nope': this node's folder has dusk\.v2, ink"
    ) as info:
        nodes.embeds(request)
    assert info.value.field == "loras"
    job = DenoiseJob(job_id="d", request_id="r", request=request, embeds={"prompt_embeds": torch.zeros(1, 77, 32)})
    with pytest.raises(RequestError, match="unknown LoRA adapter 'nope'"):
        nodes.denoise_handler([job], lambda step, total, previews=None: None)


def test_a_file_added_to_the_folder_is_served_without_a_restart(adapters_of, tmp_path):
    _, folder = adapters_of("sd")
    library = LoraFolder(tmp_path)
    assert library.names() == []
    (tmp_path / "ink.safetensors").write_bytes((folder / "ink.safetensors").read_bytes())
    (tmp_path / "notes.txt").write_text("not an adapter")
    (tmp_path / "bad name.safetensors").write_bytes(b"")  # not a name a client can send
    assert library.names() == ["ink"]
    [(file, weight)] = library.resolve({"ink": 2})
    assert file.path == tmp_path / "ink.safetensors" and weight == 2.0


def test_a_denoiser_without_a_folder_refuses_adapters(family_checkpoint):
    stage = load_stage(str(family_checkpoint("sd")), DENOISER)
    request = request_spec("sd", prompt=PROMPT, steps=1, loras={"ink": 1.0}, height=64, width=64)
    embeds = {"prompt_embeds": torch.zeros(1, 77, stage.pipe.unet.config.cross_attention_dim)}
    with pytest.raises(RequestError, match="serves no LoRA adapters") as info:
        stage.family.denoise(stage.pipe, [(embeds, request)], lambda step, total: None)
    assert info.value.field == "loras"


def test_the_cache_evicts_the_least_recently_used_adapter_past_its_budget(adapters_of):
    checkpoint, folder = adapters_of("sd")
    stage: LoadedStage = load_stage(str(checkpoint), DENOISER)
    adapters = LoraAdapters(stage.pipe, LoraFolder(folder), max_bytes=1, parts=("unet",))
    assert adapters.activate({"ink": 1.0}) == {"ink": 1.0}
    assert adapters.activate({"dusk.v2": 1.0}) == {"dusk.v2": 1.0}  # ink goes: the budget holds none
    assert adapters.evictions == 1 and list(stage.pipe.unet.peft_config) == [adapters._loaded["dusk.v2"].adapter]
    assert adapters.activate({"ink": 1.0, "dusk.v2": 0.5}) == {"dusk.v2": 0.5, "ink": 1.0}  # the batch's own stay
    assert adapters.activate({}) == {}
    assert adapters.stats()["lora_loads"] == 3


def test_hotswap_slots_give_the_same_images_as_loading_each_adapter(adapters_of):
    checkpoint, folder = adapters_of("sd")
    options = FAMILIES["sd"][2]
    nodes = Nodes(checkpoint, folder)
    assert nodes.denoiser_adapters is not None
    nodes.denoiser_adapters.enable_hotswap(target_rank=8)
    for seed, loras in enumerate([{"ink": 1.0}, {"dusk.v2": 0.5}, {}, {"ink": 0.3, "dusk.v2": 1.0}, {"dusk.v2": 1.0}]):
        (image,) = nodes.run(request_spec(checkpoint.name, prompt=PROMPT, steps=2, seed=seed, loras=loras, **options))
        expected = reference(checkpoint, folder, loras, seed, **reference_kwargs(options, steps=2))
        assert max_difference(image, expected) <= 1, f"{loras}"
    assert len(nodes.denoiser_adapters._slots) == 2, "a swap reuses a slot; only two at once needs a second"


def test_swapping_adapters_in_a_compiled_denoiser_does_not_compile_again(adapters_of):
    import torch._dynamo

    checkpoint, folder = adapters_of("sd")
    stage = load_stage(str(checkpoint), DENOISER)
    adapters = LoraAdapters(stage.pipe, LoraFolder(folder), 1 << 30, ("unet",))
    adapters.enable_hotswap(target_rank=8)
    adapters.activate({"ink": 1.0})
    stage.pipe.unet = torch.compile(stage.pipe.unet, backend="eager")  # dynamo's guards, without a C compiler
    sample, step, text = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, 32)
    with torch.no_grad():
        stage.pipe.unet(sample, step, text)
        outputs = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for loras in ({"dusk.v2": 0.5}, {}, {"ink": 0.2}, {"dusk.v2": 0.5}):
                adapters.activate(loras)
                outputs.append(stage.pipe.unet(sample, step, text).sample)
    assert len(adapters._slots) == 1, "each adapter swapped into the one slot"
    assert torch.equal(outputs[0], outputs[3]) and not torch.allclose(outputs[0], outputs[1])
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ({f"a{i}": 1.0 for i in range(9)}, "at most 8 adapters"),
        ({"../etc/passwd": 1.0}, "adapter name is 1 to 128 characters"),
        ({"": 1.0}, "adapter name is 1 to 128 characters"),
        ({"x" * 129: 1.0}, "adapter name is 1 to 128 characters"),
        ({"ink": math.nan}, "weight of 'ink' must be a finite number between -10 and 10"),
        ({"ink": math.inf}, "finite number"),
        ({"ink": 10.5}, "finite number"),
    ],
)
def test_the_broker_refuses_bad_adapter_lists_naming_loras(loras, message):
    problem = request_error(GenerateRequest(request_id="r", prompt="p", seed=0, loras=loras))
    assert problem is not None and problem[0] == "loras" and message in problem[1]


def test_adapter_lists_within_bounds_pass_the_broker():
    loras = {f"style-{i}.v1_x": (-10.0 if i % 2 else 10) for i in range(8)}
    assert request_error(GenerateRequest(request_id="r", prompt="p", seed=0, loras=loras)) is None


def test_adapters_cross_the_wire_to_every_stage():
    request = GenerateRequest(request_id="r", prompt="p", seed=0, loras={"ink": 0.8})
    assert wire(request).loras == {"ink": 0.8}
    assert request.spec().loras == {"ink": 0.8}
    assert wire(EncodeJob(job_id="e", request_id="r", request=request.spec())).request.loras == {"ink": 0.8}


# --- the flags, the CLI and the HTTP fields ---------------------------------------------------------


def test_the_denoiser_enables_hotswap_before_compiling_when_given_both_flags(adapters_of):
    import argparse

    from denoiser_node.main import add_arguments, build
    from triptych.node_runner import NodeContext, add_common_arguments

    checkpoint, folder = adapters_of("sd")
    parser = argparse.ArgumentParser()
    add_common_arguments(parser, DENOISER)
    add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(checkpoint), "--lora-dir", str(folder), "--compile", "--lora-max-rank", "16"]
    )
    stage = load_stage(str(checkpoint), DENOISER)
    context = NodeContext(args, DENOISER, stage.family, "cpu", torch.float32, checkpoint.name)
    service = build(context)
    unet = service.handler.stage.pipe.unet
    assert hasattr(unet, "_orig_mod"), "the UNet is compiled"
    assert unet._orig_mod._prepare_lora_hotswap_kwargs == {"target_rank": 16, "check_compiled": "error"}
    assert service.handler.adapters.hotswap and service.info["loras"] == ["dusk.v2", "ink"]


def test_the_cli_takes_lora_names_with_optional_weights():
    from triptych.cli import build_parser

    args = build_parser().parse_args(["generate", "p", "--lora", "ink", "--lora", "dusk.v2:-0.5"])
    assert args.lora == [("ink", 1.0), ("dusk.v2", -0.5)]


@pytest.mark.parametrize("option", ["ink:nan", "ink:inf", "ink:heavy"])
def test_the_cli_refuses_a_weight_that_is_not_a_finite_number(option, capsys):
    from triptych.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "p", "--lora", option])
    assert "argument --lora: the weight of 'ink' must be a" in capsys.readouterr().err


def test_the_http_body_takes_loras_as_name_and_weight_objects():
    from triptych.http import ApiError, parse_generation

    body = {"prompt": "p", "loras": [{"name": "ink", "weight": 0.8}, {"name": "dusk.v2"}]}
    assert parse_generation(body).loras == {"ink": 0.8, "dusk.v2": 1.0}
    assert parse_generation({"prompt": "p"}).loras == {}
    for loras in (
        "ink",
        [{"name": "ink", "weight": "heavy"}],
        [{"name": "ink", "weight": math.inf}],
        [{"name": "a/b"}],
    ):
        with pytest.raises(ApiError) as info:
            parse_generation({"prompt": "p", "loras": loras})
        assert (info.value.status, info.value.param) == (400, "loras"), loras


class _RecordingClient:
    """A broker connection whose denoiser of "m" has two adapters; generate keeps what it was asked."""

    asked: list[dict] = []

    def status(self, timeout: float = 5.0):
        from protocol.messages import StatusReply

        info = {"samplers": ["euler"], "loras": ["ink", "dusk.v2"]}
        return StatusReply(request_id="s", nodes=[{"service": "denoiser", "model": "m", "node": "h:1", "info": info}])

    def generate(self, prompt: str, *, num_images: int, seed, **options):
        from triptych.client import GeneratedImage

        self.asked.append(options)
        return [GeneratedImage(index=i, seed=0, png=b"png", params={}) for i in range(num_images)]

    def close(self) -> None:
        pass


def test_the_gateway_lists_a_models_adapters_and_passes_them_on():
    import json
    import urllib.request

    from tests.support import serving_app
    from triptych.http import create_app

    with serving_app(create_app("tcp://unused:1", client_factory=_RecordingClient)) as url:
        with urllib.request.urlopen(f"{url}/v1/models/m", timeout=10) as response:
            assert json.loads(response.read())["loras"] == ["dusk.v2", "ink"]
        body = json.dumps({"prompt": "p", "loras": [{"name": "ink", "weight": 0.5}]}).encode()
        request = urllib.request.Request(
            f"{url}/v1/images/generations", data=body, headers={"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=10).close()
        form, boundary = (
            _multipart({"prompt": "p", "loras": '[{"name": "dusk.v2", "weight": 2}]'}, image=b"img"),
            "b0undary",
        )
        edit = urllib.request.Request(
            f"{url}/v1/images/edits", data=form, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        urllib.request.urlopen(edit, timeout=10).close()
    assert [asked["loras"] for asked in _RecordingClient.asked[-2:]] == [{"ink": 0.5}, {"dusk.v2": 2.0}]


def _multipart(fields: dict[str, str], image: bytes) -> bytes:
    parts = [f'--b0undary\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    parts.append('--b0undary\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n\r\n')
    return "".join(parts).encode() + image + b"\r\n--b0undary--\r\n"


# --- real node processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_cluster(adapters_of, tmp_path_factory):
    """A broker, and SD nodes whose encoder and denoiser serve a folder of adapters (the session cluster's
    nodes have none); the folder is a copy, so a test may add to it."""
    import shutil

    from tests.support import ProcessCluster

    checkpoint, source = adapters_of("sd")
    folder = tmp_path_factory.mktemp("served-loras")
    for file in source.iterdir():
        shutil.copy(file, folder / file.name)
    cluster = ProcessCluster(tmp_path_factory.mktemp("lora-cluster-logs"))
    cluster.start_broker()
    try:
        cluster.start_node(ENCODER, checkpoint, "--lora-dir", str(folder))
        cluster.start_node(DENOISER, checkpoint, "--lora-dir", str(folder), "--lora-cache-mb", "64")
        cluster.start_node(DECODER, checkpoint)
        cluster.wait_for({(service, checkpoint.name): 1 for service in (ENCODER, DENOISER, DECODER)})
        yield cluster, checkpoint, folder
    finally:
        cluster.stop()


@pytest.mark.e2e
def test_nodes_serve_adapters_as_diffusers_makes_them(lora_cluster):
    cluster, checkpoint, folder = lora_cluster
    options = FAMILIES["sd"][2]
    with cluster.client() as client:
        images = client.generate(PROMPT, steps=3, seed=4, num_images=2, loras={"ink": 0.8, "dusk.v2": 0.5}, **options)
        plain = client.generate(PROMPT, steps=3, seed=4, **options)
    for image in images:
        expected = reference(checkpoint, folder, {"ink": 0.8, "dusk.v2": 0.5}, image.seed, **reference_kwargs(options))
        assert max_difference(Image.open(io.BytesIO(image.png)), expected) <= 1
    assert read_metadata(images[0].png)["loras"] == "ink:0.8,dusk.v2:0.5"
    assert (
        max_difference(
            Image.open(io.BytesIO(plain[0].png)), reference(checkpoint, folder, {}, 4, **reference_kwargs(options))
        )
        <= 1
    )


@pytest.mark.e2e
def test_an_unknown_adapter_or_a_weight_that_is_no_number_fails_naming_loras(lora_cluster):
    from protocol import errors
    from triptych.client import GenerationError

    cluster, _, _ = lora_cluster
    with cluster.client() as client:
        with pytest.raises(
            GenerationError, match=r"unknown LoRA adapter 'sepia': this node's folder has dusk\.v2, ink"
        ) as info:
            client.generate(PROMPT, steps=1, seed=0, height=64, width=64, loras={"sepia": 1.0})
        assert (info.value.code, info.value.field) == (errors.INVALID_REQUEST, "loras")
        with pytest.raises(GenerationError, match="must be a finite number") as info:
            client.generate(PROMPT, steps=1, seed=0, height=64, width=64, loras={"ink": math.nan})
        assert (info.value.code, info.value.field) == (errors.INVALID_REQUEST, "loras")
        with pytest.raises(GenerationError, match="a name with a number as its weight"):
            client.generate(PROMPT, steps=1, loras={"ink": "heavy"})  # type: ignore[dict-item]


@pytest.mark.e2e
def test_an_adapter_added_to_the_folder_is_served_and_listed_in_status(lora_cluster):
    cluster, checkpoint, folder = lora_cluster
    nodes = {node["service"]: node for node in cluster.nodes()}
    assert nodes[DENOISER]["info"]["loras"] == ["dusk.v2", "ink"] and nodes[ENCODER]["info"]["loras"] == [
        "dusk.v2",
        "ink",
    ]
    make_lora(checkpoint, folder, "sepia", seed=3, text_encoders=("text_encoder",))
    result = cluster.generate_cli(
        PROMPT,
        "--steps",
        "1",
        "--seed",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--lora",
        "sepia:0.7",
        "--out",
        str(folder / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert read_metadata(Path(result.stdout.strip()).read_bytes())["loras"] == "sepia:0.7"
    unknown = cluster.generate_cli(PROMPT, "--steps", "1", "--lora", "nope", "--out", str(folder / "out"))
    assert unknown.returncode == 1 and "triptych: error: --lora: unknown LoRA adapter 'nope'" in unknown.stderr


# --- plumbing: up/run, the web UI API, discovery ------------------------------------------------------


def test_up_and_run_pass_the_lora_folder_to_the_encoder_and_the_denoiser(monkeypatch, tmp_path):
    import subprocess

    from triptych import cli, launcher

    started: dict[str, list[str]] = {}

    class Recorder:
        def __init__(self, command: list[str], **_: object) -> None:
            started[command[2]] = command

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    launcher.Cluster("m", bind="tcp://127.0.0.1:1", lora_dir=str(tmp_path)).start()
    with_folder = {key for key, command in started.items() if ["--lora-dir", str(tmp_path)] == command[-4:-2]}
    assert with_folder == {"encoder_node", "denoiser_node"}  # the broker and the decoder load no adapters

    given: list[str | None] = []

    class Stopped(launcher.Cluster):
        def __enter__(self):
            given.append(self.lora_dir)
            raise launcher.LaunchError("not started here")

    monkeypatch.setattr(launcher, "Cluster", Stopped)
    assert cli.main(["run", "p", "--model", "m", "--lora-dir", str(tmp_path)]) == 1
    assert cli.main(["up", "--model", "m", "--lora-dir", str(tmp_path)]) == 1
    assert given == [str(tmp_path), str(tmp_path)]
    assert cli.main(["run", "p", "--model", "m", "--lora-dir", str(tmp_path / "missing")]) == 2  # before starting


def test_status_json_lists_each_models_samplers_and_adapters():
    from protocol.messages import StatusReply
    from triptych.status import status_dict

    nodes = [
        {"service": "denoiser", "model": "m", "node": "a:1", "info": {"samplers": ["euler"], "loras": ["ink"]}},
        {"service": "denoiser", "model": "m", "node": "b:1", "info": {"samplers": ["euler"], "loras": ["dusk"]}},
        {"service": "encoder", "model": "m", "node": "a:2", "info": {"loras": ["other"]}},
        {"service": "denoiser", "model": "n", "node": "c:1", "info": {"samplers": [], "step_caches": ["first_block"]}},
    ]
    models = status_dict(StatusReply(request_id="s", nodes=nodes))["models"]
    assert models == {
        "m": {"samplers": ["euler"], "loras": ["dusk", "ink"], "step_caches": []},
        "n": {"samplers": [], "loras": [], "step_caches": ["first_block"]},
    }


@pytest.mark.e2e
def test_webuiapi_lora_tags_give_diffusers_images_and_an_unknown_one_lists_the_folder(lora_cluster):
    import webuiapi
    from diffusers import EulerAncestralDiscreteScheduler

    from tests.support import serving_app
    from triptych.http import create_app

    cluster, checkpoint, folder = lora_cluster
    options = FAMILIES["sd"][2]
    with serving_app(create_app(cluster.address, timeout=120)) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))  # its default sampler: "Euler a"
        assert {"name": "ink", "alias": "ink", "path": "ink.safetensors", "metadata": {}} in api.get_loras()
        result = api.txt2img(
            prompt=f"<lora:ink:0.8>{PROMPT} <lora:dusk.v2>", seed=4, steps=3, cfg_scale=5.0, width=64, height=64
        )
        with pytest.raises(RuntimeError) as caught:
            api.txt2img(prompt=f"{PROMPT} <lora:nope:0.5>", seed=1, steps=1, width=64, height=64)
    status, text = caught.value.args
    assert status == 400 and "unknown LoRA adapter 'nope': this node's folder has dusk.v2, ink" in text
    reference(checkpoint, folder, {}, 0, **reference_kwargs(options, steps=1))  # builds the reference pipeline
    pipe = _REFERENCES[checkpoint, folder]
    original = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        kwargs = reference_kwargs(options) | {"prompt": f"{PROMPT} "}  # the tags taken out, the text kept
        expected = reference(checkpoint, folder, {"ink": 0.8, "dusk.v2": 1.0}, 4, **kwargs)
    finally:
        pipe.scheduler = original
    assert max_difference(result.image, expected) <= 1
