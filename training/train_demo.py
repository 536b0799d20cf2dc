"""Train the demo model from nothing, on a couple of CPU cores, and write it as a Stable Diffusion checkpoint.

    python -m training.train_demo --out triptych/demo_model

Three stages, each small enough for a laptop CPU:

1. A tiny KL autoencoder (four blocks, so 128 px images become 16×16×4 latents) starts as a
   pixel-art codec set by hand (``training.flat_vae``: each latent is the colour of one pixel of
   its 8×8 block) and its decoder is fine-tuned on 64 px crops to sharpen edges; it is fully
   convolutional, so crops teach it the same edges at a quarter of the cost.
2. A fixed set of scenes is drawn and encoded once; the denoiser then trains on latents only.
   The fourth latent channel, which the decoder ignores, holds a fixed map of the 3×3 grid.
3. A small CLIP text encoder and a small UNet train together from scratch: v-prediction on a
   zero-terminal-SNR schedule (so pure noise at inference matches the noisiest training step and
   the background's flat colour is not biased towards grey), the prompt dropped to "" one time in
   ten for classifier-free guidance, object latents weighted above background ones, half the
   timesteps drawn from the noisy end where layout is decided, and an exponential moving average
   of both networks as the shipped weights.

The checkpoint is diffusers' StableDiffusionPipeline layout in fp16 safetensors, with a DDIM
scheduler (trailing timesteps) and ``training.json`` recording every setting and the seed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from training.flat_vae import PIXEL_IN_BLOCK, init_pixel_art
from training.scenes import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, held_out_triples, render, training_example
from training.tokenizer import build_tokenizer

# The noise schedule of training and inference: SD's scaled-linear betas, rescaled so the last step is pure noise.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}


@dataclass
class Settings:
    """Everything that shapes the result; written to training.json beside the weights."""

    seed: int = 0
    threads: int = 1  # torch threads; one avoids thrashing on a busy machine
    vae_steps: int = 300  # decoder fine-tuning steps, from the pixel-art codec
    vae_batch: int = 8
    vae_crop: int = 64  # pixels; a multiple of 8
    vae_lr: float = 1e-4
    vae_channels: tuple[int, ...] = (16, 16, 16, 16)
    examples: int = 12000  # scenes drawn and encoded once for the denoiser
    steps: int = 4500  # denoiser optimisation steps
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 100
    ema: float = 0.998
    high_noise_share: float = 0.5  # of training timesteps, drawn from the noisiest 40% rather than all
    object_weight: float = 5.0  # loss weight of object latents against background ones
    uncond_prob: float = 0.1  # prompts replaced by "" so the model learns the unconditional score too
    text_width: int = 128
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 64)
    log_every: int = 50
    snapshot_every: int = 0  # if > 0, also write the EMA weights every this many steps, to watch a long run


# --- the networks -------------------------------------------------------------------------------


def make_vae(s: Settings) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=s.vae_channels,
        layers_per_block=1,
        norm_num_groups=1,  # one group, so the pixel-art codec's constant channel steadies every norm
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,  # flat colours need no global attention; it would also tie the VAE to one size
    )


def make_text_encoder(s: Settings, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.text_width,
        intermediate_size=2 * s.text_width,
        num_hidden_layers=s.text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        projection_dim=s.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(s: Settings) -> UNet2DConditionModel:
    """Three levels (16, 8, 4): plain convolutions at full latent size, cross-attention below it."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,  # the pipeline's default size: 16 latents, 128 px
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=s.unet_channels,
        layers_per_block=1,
        norm_num_groups=8,  # 4 channels a group at the top level, so a flat colour survives the norms
        cross_attention_dim=s.text_width,
        attention_head_dim=4,  # SD1.5's quirk: this is the number of heads
    )


def inference_scheduler() -> DDIMScheduler:
    """DDIM over the training schedule; trailing timesteps start at the pure-noise step."""
    return DDIMScheduler(
        **SCHEDULE, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=1
    )


# --- stage 1: the autoencoder ------------------------------------------------------------------


def to_tensor(images: list) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def random_crops(images: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """One crop of ``size`` per image, on the 8-pixel grid the latents use."""
    crops = []
    for image in images:
        top, left = (8 * rng.randrange((IMAGE_SIZE - size) // 8 + 1) for _ in range(2))
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops)


def train_vae(s: Settings, rng: random.Random, log: Progress) -> AutoencoderKL:
    """The pixel-art codec, its decoder then fine-tuned to draw sharper edges than 8×8 blocks.

    The encoder stays as set, so latents remain exact palette colours the UNet can learn quickly.
    """
    vae = init_pixel_art(make_vae(s))
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=s.vae_lr)
    for step in range(1, s.vae_steps + 1):
        images = to_tensor([render(training_example(rng)[0]) for _ in range(s.vae_batch)])
        x = random_crops(images, s.vae_crop, rng)  # (B, 3, crop, crop)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mode()  # (B, 4, crop / 8, crop / 8)
        mse = F.mse_loss(vae.decode(latents).sample, x)
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        optimizer.step()
        log.step("vae", step, s.vae_steps, mse=mse.item())
    vae.requires_grad_(False)
    vae.eval()
    return vae


# --- stage 2: the latent data set --------------------------------------------------------------


def grid_map() -> torch.Tensor:
    """(1, 16, 16): for each latent, the 3×3 grid cell its sampled pixel lies in, as 9 levels in [-1, 1].

    It fills the fourth latent channel, which the decoder ignores. Every training latent carries
    the same map, so the UNet must learn where each cell is to denoise it: the positional features
    that placing "a star in the top left" needs, which zero padding alone teaches slowly.
    """
    centres = torch.arange(IMAGE_SIZE // 8) * 8 + PIXEL_IN_BLOCK
    cells = (centres * 3 // IMAGE_SIZE).clamp(max=2)  # (16,) row or column of the cell
    return (cells[:, None] * 3 + cells[None, :])[None].float() / 4 - 1


@torch.no_grad()
def encode_examples(
    s: Settings, vae: AutoencoderKL, rng: random.Random, log: Progress
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Draw ``s.examples`` scenes; return their unscaled latents (N, 4, 16, 16), where their objects are
    (N, 1, 16, 16: latents not of the background's colour) and their prompts.

    The encoder is the pixel-art codec's, untouched by training, so a latent is the pixel it
    samples; reading those pixels directly is much faster than running the encoder on every
    image, and the first chunk checks that both agree.
    """
    latents, objects, prompts, chunk = [], [], [], 256
    for start in range(0, s.examples, chunk):
        batch = [training_example(rng) for _ in range(min(chunk, s.examples - start))]
        prompts += [prompt for _, prompt in batch]
        images = to_tensor([render(scene) for scene, _ in batch])  # (B, 3, 128, 128)
        sampled = images[:, :, PIXEL_IN_BLOCK::8, PIXEL_IN_BLOCK::8]  # (B, 3, 16, 16)
        if start == 0:
            encoded = vae.encode(images[:16]).latent_dist.mode()
            if not torch.allclose(encoded[:, :3], sampled[:16], atol=1e-2):
                raise RuntimeError("the encoder no longer samples one pixel per block")
        sampled = torch.cat([sampled, grid_map().expand(len(batch), 1, -1, -1)], 1)  # (B, 4, 16, 16)
        backgrounds = torch.tensor([COLOURS[scene.background] for scene, _ in batch]) / 127.5 - 1  # (B, 3)
        distance = (sampled[:, :3] - backgrounds[:, :, None, None]).abs().amax(1, keepdim=True)
        latents.append(sampled)
        objects.append(distance > 0.1)
        log.step("encode", min(start + chunk, s.examples), s.examples)
    return torch.cat(latents), torch.cat(objects), prompts


# --- stage 3: text encoder and UNet ------------------------------------------------------------


class Ema:
    """Exponential moving average of some modules' parameters, warmed up so early steps count less."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module] | None = None) -> None:
        """Load the averages into the tracked modules, or into same-shaped ``modules``."""
        params = self.params if modules is None else [p for m in modules for p in m.parameters()]
        for param, shadow in zip(params, self.shadow, strict=True):
            param.copy_(shadow)


def sample_timesteps(s: Settings, total: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) training timesteps: uniform, but a share ``s.high_noise_share`` from the noisiest 40%.

    The noisy end is where a scene's layout is decided (which colour goes where); the flat
    colours' clean-up at low noise is easy and needs fewer steps.
    """
    uniform = torch.randint(total, (s.batch,), generator=generator)
    high = torch.randint(int(0.6 * total), total, (s.batch,), generator=generator)
    return torch.where(torch.rand(s.batch, generator=generator) < s.high_noise_share, high, uniform)


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, max_tokens) ids, padded and truncated exactly as StableDiffusionPipeline.encode_prompt does."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_denoiser(
    s: Settings,
    latents: torch.Tensor,
    objects: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    log: Progress,
    snapshot: Callable[[Ema, int], None] | None = None,
) -> None:
    """Joint v-prediction training of ``text_encoder`` and ``unet`` on scaled latents; leaves them at their EMA.

    The loss weighs latents of objects ``s.object_weight`` times those of the background: a small
    shape is a few latents of 256, and would otherwise be learnt long after the background colour.
    """
    noise_schedule = DDPMScheduler(**SCHEDULE)
    modules = [text_encoder, unet]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.99), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(s.steps - s.warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    ema = Ema(modules, s.ema)
    generator = torch.Generator().manual_seed(s.seed)
    for step in range(1, s.steps + 1):
        pick = torch.randint(len(latents), (s.batch,), generator=generator)
        x0 = latents[pick]  # (B, 4, 16, 16)
        drop = torch.rand(s.batch, generator=generator) < s.uncond_prob
        batch_ids = torch.where(drop[:, None], empty_ids, ids[pick])  # (B, max_tokens)
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(s, noise_schedule.config.num_train_timesteps, generator)
        noisy = noise_schedule.add_noise(x0, noise, t)
        target = noise_schedule.get_velocity(x0, noise, t)
        context = text_encoder(batch_ids)[0]  # (B, max_tokens, text_width): the pipeline's prompt_embeds
        weight = 1 + (s.object_weight - 1) * objects[pick].float()  # (B, 1, 16, 16)
        loss = (weight * (unet(noisy, t, context).sample - target) ** 2).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.update(step)
        log.step("denoiser", step, s.steps, loss=loss.item())
        if snapshot is not None and s.snapshot_every and step % s.snapshot_every == 0 and step < s.steps:
            snapshot(ema, step)
    ema.copy_to()


# --- driving it --------------------------------------------------------------------------------


class Progress:
    """Prints a line every ``every`` steps of a stage: the step, smoothed losses, elapsed time, and an estimate left."""

    def __init__(self, every: int) -> None:
        self.every = max(every, 1)
        self.start = time.monotonic()
        self.stage_start = self.start
        self.stage = ""
        self.smoothed: dict[str, float] = {}

    def step(self, stage: str, step: int, total: int, **losses: float) -> None:
        if stage != self.stage:
            self.stage, self.stage_start, self.smoothed = stage, time.monotonic(), {}
        for name, value in losses.items():
            self.smoothed[name] = value if name not in self.smoothed else 0.95 * self.smoothed[name] + 0.05 * value
        if step % self.every and step != total:
            return
        now = time.monotonic()
        left = (now - self.stage_start) / step * (total - step)
        shown = " ".join(f"{name} {value:.4f}" for name, value in self.smoothed.items())
        print(
            f"[{now - self.start:7.1f}s] {stage} {step}/{total} {shown} (stage {left:.0f}s left)",
            flush=True,
        )


@torch.no_grad()
def latent_scale(latents: torch.Tensor) -> float:
    """The VAE scaling factor: what makes the latents unit-variance, as the UNet's noise is."""
    return float(1.0 / latents.std())


def train(s: Settings, out: Path) -> StableDiffusionPipeline:
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)
    log = Progress(s.log_every)
    started = time.monotonic()

    vae = train_vae(s, rng, log)
    raw, objects, prompts = encode_examples(s, vae, rng, log)
    scale = latent_scale(raw)
    vae.register_to_config(scaling_factor=scale)
    print(f"latents: mean {raw.mean():.3f}, std {raw.std():.3f} -> scaling_factor {scale:.4f}", flush=True)

    tokenizer = build_tokenizer()
    text_encoder, unet = make_text_encoder(s, tokenizer), make_unet(s)
    text_encoder.train()
    unet.train()
    ids, empty_ids = token_ids(tokenizer, prompts), token_ids(tokenizer, [""])

    def snapshot(ema: Ema, step: int) -> None:
        copies = [copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()]
        ema.copy_to(copies)
        save(assemble(vae, tokenizer, *copies), s, out.with_name(f"{out.name}-step{step}"), time.monotonic() - started)

    train_denoiser(s, raw * scale, objects, ids, empty_ids, text_encoder, unet, log, snapshot)
    pipe = assemble(vae, tokenizer, text_encoder.eval(), unet.eval())
    save(pipe, s, out, time.monotonic() - started)
    return pipe


def assemble(
    vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save(pipe: StableDiffusionPipeline, s: Settings, out: Path, seconds: float) -> None:
    """Write the checkpoint in fp16 (a few MB) with training.json: settings, seed, time, held-out triples."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    record = {
        "settings": dataclasses.asdict(s),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "world": {
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "positions": list(POSITIONS),
            "example": "a small yellow star in the top left on a dark blue background",
        },
        "held_out_triples": sorted(map(list, held_out_triples())),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} in {seconds:.0f}s", flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m training.train_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("triptych/demo_model"), help="checkpoint folder to write")
    for field in dataclasses.fields(Settings):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(default))
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return Settings(**values), args.out


def main(argv: list[str] | None = None) -> int:
    settings, out = parse_args(argv)
    print(f"training the demo model into {out}: {settings}", flush=True)
    train(settings, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
