"""CPU pipeline: triptych (broker + three node processes) against diffusers in one process.

A Stable Diffusion checkpoint with random weights is written to a temp folder: a CLIP-L-sized
text encoder (12 layers, width 768), a mid-sized UNet (64/128/256 channels) and VAE, 256 px.
Its denoise takes a few seconds per image on two cores. Both sides are warm (one untimed
image each; triptych also one batch) before anything is timed, and use the same settings.

  1. One request: triptych's wall time (client call to PNG) against ``pipe(...)`` for the
     same prompt, negative prompt and seed. Both prompts are new to the encoder, so its cache
     plays no part. Alternated, median of ``--repeat``. Target: triptych <= 1.05x diffusers.
  2. The same prompt again: the encode stage as the client sees it (from the encoder job's
     start to the denoiser job's start, from the progress events) for a new prompt and then
     for the same one (one denoising step: only the encode stage is timed). The encoder node
     caches embeddings. Target: the cached prompt saves >= 70% of the stage.
  3. Throughput: 12 requests over 3 prompts, submitted at once (one Client per request, in
     threads), against a loop of the same 12 ``pipe(...)`` calls. The denoiser batches
     compatible requests (``--max-batch``, default 4) while the encoder and decoder work on
     others. Target: triptych >= 1.5x the images per second. Also printed: the ceiling, the loop's
     time over the least work any serving of the 12 must do on these same cores.

Measures 1 and 2 start the nodes as ``triptych run`` does, measure 3 as ``triptych up`` does
(their CPU threads differ: see ``triptych.launcher.cpu_threads``).

    python benchmarks/cpu_pipeline.py                     # about 3 minutes on two cores
    python benchmarks/cpu_pipeline.py --tiny --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from benchlib import describe, machine, median, table, verdict, write_json
from PIL import Image

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # notices about optional packages
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # saving and loading checkpoints

TARGET_SINGLE = 1.05  # triptych / diffusers wall time, one request
TARGET_CACHE = 0.70  # share of the encode stage a cached prompt saves
TARGET_THROUGHPUT = 1.5  # triptych / diffusers images per second, 12 concurrent requests
THROUGHPUT_PROMPTS = ("a red fox in the snow", "a lighthouse on a cliff at dusk", "a bowl of ramen, studio light")
SERVICES = ("encoder", "denoiser", "decoder")


# --- the checkpoint -------------------------------------------------------------------------


def build_checkpoint(folder: Path, tiny: bool) -> Path:
    """A random-weight SD 1.5-style checkpoint; tiny: triptych's test checkpoint."""
    from triptych.testing import build_tiny_checkpoint

    if tiny:
        return build_tiny_checkpoint("sd", folder)
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from triptych.testing.components import clip_text_config
    from triptych.testing.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    # CLIP ViT-L/14's text tower (SD 1.5's encoder) over the offline tokenizer's vocabulary.
    config = clip_text_config(tokenizer, 768, 1, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12)
    text_encoder = CLIPTextModel(config)
    unet = UNet2DConditionModel(
        sample_size=32,  # 256 px
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.18215,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


# --- triptych's side ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cluster(model: Path, threads: dict[str, int] | None, share_cores: bool) -> Iterator[tuple[str, dict[str, int]]]:
    """The launcher's processes: as ``triptych up`` starts them (``share_cores``), or as ``triptych run``
    does; ``threads`` overrides OMP_NUM_THREADS per node."""
    from triptych.launcher import Cluster

    address = f"tcp://127.0.0.1:{free_port()}"
    nodes = Cluster(
        str(model),
        bind=address,
        device="cpu",
        dtype="float32",
        log_level="WARNING",
        threads=threads,
        share_cores=share_cores,
    )
    with nodes:
        yield address, nodes.node_threads()


def timed_request(address: str, prompt: str, **options: object) -> dict:
    """One request through a fresh client: wall time, stage times from the progress events, PNG."""
    from triptych.client import Client

    starts: dict[str, float] = {}

    def on_progress(event) -> None:
        starts.setdefault(event.service, time.perf_counter())

    with Client(address, timeout=600.0) as client:
        begin = time.perf_counter()
        (image,) = client.generate(prompt, on_progress=on_progress, **options)
        end = time.perf_counter()
    return {
        "total_s": end - begin,
        "encode_s": starts["denoiser"] - starts["encoder"],
        "denoise_s": starts["decoder"] - starts["denoiser"],
        "decode_s": end - starts["decoder"],
        "png": image.png,
    }


def node_stats(address: str) -> dict[str, dict]:
    from triptych.client import Client

    with Client(address) as client:
        return {node["service"]: dict(node.get("stats") or {}) for node in client.status().nodes}


def concurrent(address: str, requests: list[tuple[str, int]], steps: int) -> float:
    """Submit every (prompt, seed) at once, one client each; seconds until the last image."""
    barrier = threading.Barrier(len(requests) + 1)
    errors: list[BaseException] = []

    def one(prompt: str, seed: int) -> None:
        from triptych.client import Client

        try:
            with Client(address, timeout=900.0) as client:
                barrier.wait()
                client.generate(prompt, seed=seed, steps=steps)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=request) for request in requests]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} concurrent request(s) failed: {errors[0]}")
    return elapsed


# --- diffusers' side ------------------------------------------------------------------------


def diffusers_call(pipe, prompt: str, seed: int, steps: int, negative: str | None = None) -> tuple[float, Image.Image]:
    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(seed)
    (image,) = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, generator=generator).images
    return time.perf_counter() - start, image


def pixel_difference(png: bytes, image: Image.Image) -> int:
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return int(np.abs(got - np.asarray(image.convert("RGB")).astype(np.int16)).max())


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, folder: Path) -> dict:
    import diffusers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    steps, repeat = (2, 1) if args.tiny else (args.steps, args.repeat)
    result: dict = {"steps": steps, "repeat": repeat}
    model = build_checkpoint(folder / "checkpoint", args.tiny)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    result["parameters_m"] = {
        name: sum(p.numel() for p in module.parameters()) / 1e6
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
    threads = None
    if args.node_threads:
        threads = dict(zip(SERVICES, (int(n) for n in args.node_threads.split(",")), strict=True))
    result["diffusers_threads"] = torch.get_num_threads()

    # Measures 1 and 2 are one request at a time: the nodes as `triptych run` starts them.
    with cluster(model, threads, share_cores=False) as (address, node_threads):
        result["single_node_threads"] = node_threads or "torch default"
        # Warm both sides: an image each.
        diffusers_call(pipe, "warm up", 0, steps)
        timed_request(address, "warm up", seed=0, steps=steps)

        # 1. One request each, alternating; prompts and negative prompts new to the encoder.
        single = {"triptych": [], "diffusers": [], "stages": [], "max_pixel_difference": 0}
        for i in range(repeat):
            prompt, negative, seed = f"a photo of a small boat number {i}", f"blurry {i}", 10 + i
            seconds, image = diffusers_call(pipe, prompt, seed, steps, negative)
            single["diffusers"].append(seconds)
            timing = timed_request(address, prompt, negative_prompt=negative, seed=seed, steps=steps)
            single["triptych"].append(timing["total_s"])
            single["stages"].append({k: v for k, v in timing.items() if k.endswith("_s")})
            single["max_pixel_difference"] = max(single["max_pixel_difference"], pixel_difference(timing["png"], image))
        single["ratio"] = median(single["triptych"]) / median(single["diffusers"])
        result["single"] = single

        # 2. The same prompt twice: the encode stage without and with the encoder's cache.
        # Only the encode stage is timed here, so one denoising step will do.
        cache = {"miss_s": [], "hit_s": []}
        for i in range(repeat):
            prompt, negative = f"a castle on a hill, version {i}", f"dark {i}"
            cache["miss_s"].append(timed_request(address, prompt, negative_prompt=negative, steps=1)["encode_s"])
            cache["hit_s"].append(timed_request(address, prompt, negative_prompt=negative, steps=1)["encode_s"])
        with torch.inference_mode():
            encode_s = [
                _seconds(lambda i=i: pipe.encode_prompt(f"new prompt {i}", "cpu", 1, True, f"new negative {i}"))
                for i in range(3)
            ]
        cache["in_process_encode_s"] = median(encode_s)  # diffusers' encode_prompt, prompt + negative
        cache["saved"] = 1 - median(cache["hit_s"]) / median(cache["miss_s"])
        result["cache"] = cache

    # Measure 3 serves many requests at once: the nodes as `triptych up` starts them.
    with cluster(model, threads, share_cores=True) as (address, node_threads):
        result["node_threads"] = node_threads or "torch default"
        timed_request(address, "warm up", seed=0, steps=steps)
        concurrent(address, [(f"warm up {i}", i) for i in range(args.max_batch)], steps)  # one full batch

        # 3. Throughput: 12 requests over 3 prompts, all at once, against a loop of the same 12.
        requests = [(THROUGHPUT_PROMPTS[i % 3], 100 + i) for i in range(args.requests)]
        before = node_stats(address)
        loop_s = sum(diffusers_call(pipe, prompt, seed, steps)[0] for prompt, seed in requests)
        burst_s = concurrent(address, requests, steps)
        after = node_stats(address)
        batches = after["denoiser"].get("batches", 0) - before["denoiser"].get("batches", 0)
        result["throughput"] = {
            "requests": len(requests),
            "diffusers_s": loop_s,
            "triptych_s": burst_s,
            "ratio": loop_s / burst_s,
            "denoiser_batches": batches,
            "encoder_cache_hits": after["encoder"].get("cache_hits", 0) - before["encoder"].get("cache_hits", 0),
        }
    # What batching alone can give here: one UNet step for one request (its CFG pair) against
    # a full batch, per request, in this process with the cluster gone.
    burst = result["throughput"]
    burst["unet_step_s"] = {
        "one_request": unet_step(pipe, 1),
        "per_request_in_full_batch": unet_step(pipe, args.max_batch) / args.max_batch,
    }
    # The most any serving of these requests could give on this machine: every image still needs
    # its denoise (in full batches) and its decode, and each distinct prompt one encode, all on
    # the same cores. Overlap adds no compute here, so the diffusers loop over this is the ceiling.
    decode_s = median([stage["decode_s"] for stage in single["stages"]])
    burst["distinct_prompts"] = len({prompt for prompt, _ in requests})
    step_s = burst["unet_step_s"]["per_request_in_full_batch"]
    least_s = len(requests) * (steps * step_s + decode_s) + burst["distinct_prompts"] * median(cache["miss_s"])
    burst["least_work_s"] = least_s
    burst["ceiling_ratio"] = loop_s / least_s
    return result


def unet_step(pipe, requests: int) -> float:
    unet = pipe.unet
    size = unet.config.sample_size
    sample = torch.randn(2 * requests, unet.config.in_channels, size, size)  # (2B, 4, h, w): CFG doubles B
    embeds = torch.randn(2 * requests, 77, unet.config.cross_attention_dim)  # (2B, 77, 768)
    with torch.inference_mode():
        unet(sample, 500, encoder_hidden_states=embeds)
        return median([_seconds(lambda: unet(sample, 500, encoder_hidden_states=embeds)) for _ in range(3)])


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(r: dict) -> None:
    single, cache, burst = r["single"], r["cache"], r["throughput"]
    stages = {key: median([s[key] for s in single["stages"]]) for key in single["stages"][0]}
    print(f"checkpoint parameters (M): {', '.join(f'{k} {v:.1f}' for k, v in r['parameters_m'].items())}")
    print(
        f"{r['steps']} steps, 256 px; node threads: measures 1-2 {r['single_node_threads']}, measure 3 "
        f"{r['node_threads']}; diffusers threads {r['diffusers_threads']}"
    )
    print(
        table(
            ["measure", "triptych", "diffusers", "ratio", "target", "verdict"],
            [
                [
                    "1. one request, s (median)",
                    median(single["triptych"]),
                    median(single["diffusers"]),
                    single["ratio"],
                    f"<= {TARGET_SINGLE}",
                    verdict(single["ratio"] <= TARGET_SINGLE),
                ],
                [
                    "2. encode stage, s: new / cached prompt",
                    f"{median(cache['miss_s']):.3f} / {median(cache['hit_s']):.3f}",
                    cache["in_process_encode_s"],
                    f"saves {cache['saved']:.0%}",
                    f">= {TARGET_CACHE:.0%}",
                    verdict(cache["saved"] >= TARGET_CACHE),
                ],
                [
                    f"3. {burst['requests']} requests, images/s",
                    burst["requests"] / burst["triptych_s"],
                    burst["requests"] / burst["diffusers_s"],
                    burst["ratio"],
                    f">= {TARGET_THROUGHPUT}",
                    verdict(burst["ratio"] >= TARGET_THROUGHPUT),
                ],
            ],
        )
    )
    print(
        f"one request through triptych, s: encode {stages['encode_s']:.3f}, denoise {stages['denoise_s']:.3f}, "
        f"decode+PNG {stages['decode_s']:.3f}, total {stages['total_s']:.3f}; "
        f"largest pixel difference from diffusers: {single['max_pixel_difference']}/255"
    )
    print(
        f"{burst['requests']} requests: triptych {burst['triptych_s']:.1f}s in {burst['denoiser_batches']} denoiser "
        f"batches, {burst['encoder_cache_hits']} encoder cache hits; diffusers loop {burst['diffusers_s']:.1f}s"
    )
    step = burst["unet_step_s"]
    print(
        f"batching alone: a UNet step costs {step['one_request']:.3f}s for one request, "
        f"{step['per_request_in_full_batch']:.3f}s per request in a full batch "
        f"({step['one_request'] / step['per_request_in_full_batch']:.2f}x)"
    )
    print(
        f"ceiling on this machine: the {burst['requests']} images' denoising (in full batches), decoding and "
        f"{burst['distinct_prompts']} encodes alone take "
        f"{burst['least_work_s']:.1f}s on these cores, so no schedule beats the loop by more than "
        f"{burst['ceiling_ratio']:.2f}x"
    )
    print(f"result: one request, triptych / diffusers = {single['ratio']:.3f} (target <= {TARGET_SINGLE})")
    print(f"result: cached prompt saves {cache['saved']:.0%} of the encode stage (target >= {TARGET_CACHE:.0%})")
    print(f"result: throughput, triptych / diffusers = {burst['ratio']:.2f}x (target >= {TARGET_THROUGHPUT}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="denoising steps (default 15; 2 with --tiny)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats of measures 1 and 2 (default 3)")
    parser.add_argument("--requests", type=int, default=12, help="requests in the throughput measure (default 12)")
    parser.add_argument(
        "--max-batch", type=int, default=4, help="the denoiser node's --max-batch: warms that batch size (default 4)"
    )
    parser.add_argument(
        "--node-threads",
        metavar="E,D,V",
        help="OMP_NUM_THREADS for the encoder, denoiser and decoder processes (default: as `triptych up` sets them)",
    )
    parser.add_argument("--tiny", "--smoke", action="store_true", help="triptych's tiny test checkpoint, 2 steps")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    if args.tiny:
        # Miniature models are all per-op overhead: a second thread only adds waiting on a busy machine.
        torch.set_num_threads(1)
        args.node_threads = args.node_threads or "1,1,1"
    info = machine()
    print(f"cpu_pipeline benchmark | {describe(info)}")
    with tempfile.TemporaryDirectory(prefix="triptych-cpu-bench-") as folder:
        result = run(args, Path(folder))
    report(result)
    info_after = machine()
    print(f"load average (1 min) before {info['load_avg_1m']}, after {info_after['load_avg_1m']}")
    write_json(
        args.json,
        {
            "benchmark": "cpu_pipeline",
            "mode": "tiny" if args.tiny else "full",
            "machine": info,
            "load_avg_1m_after": info_after["load_avg_1m"],
            **result,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
