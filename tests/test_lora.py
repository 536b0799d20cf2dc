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
