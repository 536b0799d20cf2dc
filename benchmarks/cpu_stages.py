"""The CPU stages: seconds, peak RSS and quality of each encoder and decoder speed option, beside fp32 eager.

The models are the published architectures with random weights, built in code (nothing is
downloaded): T5-XXL's encoder (4.7B parameters; PixArt's, SD3's and FLUX.1's), CLIP ViT-L/14's text
tower (123M), and the SDXL and FLUX.1 VAEs decoding one image. Each setting is applied by the nodes'
own code (``encoder_node.precision.quantize_int8``, ``decoder_node.main.speed_up_vae``) and set
beside the stage as diffusers runs it by default (float32, eager):

- encoders: float32, bfloat16, int8 (T5 only: the encoder node quantizes T5 / LLM encoders, not CLIPs);
  quality is the cosine similarity of each token's embedding to float32's (its minimum and mean).
  Full-size T5-XXL in float32 needs about 19 GB, more than this benchmark may take on a shared
  24 GB machine, so it is skipped there: its bfloat16 run is the reference of its int8 run.
- VAE decoders: float32 eager, bfloat16, channels-last, both, ``torch.compile`` (inductor), compile +
  bfloat16; quality is the PSNR of the 8-bit image against float32 eager's.

Full size runs each setting in a process of its own, one at a time (its peak RSS is its own, and a
setting is skipped, and says so, when the machine's available memory is short of what it needs).
``--tiny`` runs miniature configs of the same shapes in this process: a smoke test, no real figures.

    nice -n 10 python benchmarks/cpu_stages.py --json cpu_stages.json     # tens of minutes on 2 cores
    python benchmarks/cpu_stages.py --only sdxl-vae --size 1024
    python benchmarks/cpu_stages.py --tiny --skip-compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchlib import describe, machine, median, table, write_json
from published import CLIP_L, CLIP_L_TINY, FLUX_VAE, SD_VAE, T5_TINY, T5_XXL, VAE_TINY

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

SDXL_VAE = {**SD_VAE, "scaling_factor": 0.13025, "force_upcast": True}


@dataclass(frozen=True)
class Stage:
    kind: str  # "encoder" or "vae"
    config: dict[str, Any]
    tiny: dict[str, Any]
    settings: tuple[str, ...]
    need_gb: float  # memory a full-size setting needs, roughly (weights + activations + the process)


ENCODER_SETTINGS = ("float32", "bfloat16", "int8")
VAE_SETTINGS = ("float32", "bfloat16", "channels-last", "bfloat16+channels-last", "compile", "compile+bfloat16")
STAGES = {
    "t5-xxl": Stage("encoder", T5_XXL, T5_TINY, ENCODER_SETTINGS, 12.0),
    "clip-l": Stage("encoder", CLIP_L, CLIP_L_TINY, ("float32", "bfloat16"), 2.0),
    "sdxl-vae": Stage("vae", SDXL_VAE, {**SDXL_VAE, **VAE_TINY}, VAE_SETTINGS, 8.0),
    "flux-vae": Stage("vae", FLUX_VAE, {**FLUX_VAE, **VAE_TINY}, VAE_SETTINGS, 8.0),
}
T5_XXL_FP32_NOTE = "skipped: T5-XXL in float32 needs ~19 GB, too much for a shared 24 GB machine"


# --- one setting ----------------------------------------------------------------------------


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def build_encoder(name: str, config: dict, setting: str, tiny: bool) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from encoder_node.precision import quantize_int8

    torch.manual_seed(0)
    # The same weights for every setting: built in float32 and cast -- except full-size T5-XXL, built
    # in bfloat16 directly (its float32 copy would not fit), whose int8 is made from those weights.
    direct_bf16 = name == "t5-xxl" and not tiny
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if direct_bf16 else torch.float32)
    try:
        if name.startswith("t5"):
            model = T5EncoderModel(T5Config(**config, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        else:
            model = CLIPTextModel(CLIPTextConfig(**config, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if setting == "bfloat16":
        model.to(torch.bfloat16)
    elif setting == "int8":
        quantize_int8(model)
    elif setting == "float32":
        model.float()
    return model


def build_vae(config: dict, setting: str) -> Any:
    from diffusers import AutoencoderKL

    from decoder_node.main import speed_up_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval()
    parts = setting.split("+")
    if "bfloat16" in parts:
        vae.to(torch.bfloat16)
    speed_up_vae(vae, "default" if "compile" in parts else None, channels_last="channels-last" in parts)
    return vae


def run_setting(name: str, setting: str, args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    """Build, warm, time one setting of one stage; its figures and its output (float32, on the CPU)."""
    stage = STAGES[name]
    config = stage.tiny if args.tiny else stage.config
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(1)
    if stage.kind == "encoder":
        model = build_encoder(name, config, setting, args.tiny)
        tokens = 77 if name == "clip-l" else (16 if args.tiny else args.t5_tokens)
        ids = torch.randint(3, min(config["vocab_size"], 32000), (1, tokens), generator=generator)

        def call() -> torch.Tensor:
            return model(input_ids=ids).last_hidden_state  # (1, tokens, width)
    else:
        model = build_vae(config, setting)
        side = 64 if args.tiny else args.size
        latents = torch.randn(1, config["latent_channels"], side // 8, side // 8, generator=generator)
        latents = latents.to(model.dtype)

        def call() -> torch.Tensor:
            return model.decode(latents, return_dict=False)[0]  # (1, 3, side, side) in [-1, 1]

    setup_s = time.perf_counter() - start
    model_rss = rss_gb()
    warmup = 1 if (args.tiny or "compile" in setting) else args.warmup
    times = []
    with torch.inference_mode():
        for i in range(warmup + args.repeat):
            begin = time.perf_counter()
            output = call()
            if i >= warmup:
                times.append(time.perf_counter() - begin)
    figures = {
        "seconds": times,
        "median_s": median(times),
        "warmup": warmup,
        "setup_s": setup_s,
        "model_rss_gb": model_rss,
        "peak_rss_gb": peak_rss_gb(),
    }
    if "compile" in setting:
        figures["first_call_includes_compile"] = True
    return figures, output.detach().float().cpu()


# --- quality --------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    each = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).flatten()  # per token
    return {"cosine_min": each.min().item(), "cosine_mean": each.mean().item()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    def pixels(x: torch.Tensor) -> torch.Tensor:  # as the pipeline's postprocess makes 8-bit images
        return ((x / 2 + 0.5).clamp(0, 1) * 255).round().double()

    mse = torch.mean((pixels(a) - pixels(b)) ** 2).item()
    return {"psnr_db": float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()}


# --- the run --------------------------------------------------------------------------------


def in_subprocess(name: str, setting: str, args: argparse.Namespace, folder: Path) -> tuple[dict, torch.Tensor]:
    out = folder / f"{name}-{setting}"
    command = [sys.executable, __file__, "--one", f"{name}:{setting}", "--out", str(out), "--size", str(args.size)]
    command += ["--t5-tokens", str(args.t5_tokens), "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        raise RuntimeError(f"{name} {setting} failed (exit {proc.returncode}): {(errors or [''])[-1][:300]}")
    from safetensors.torch import load_file

    output = load_file(out.with_suffix(".safetensors"))["output"]  # tensors only: nothing is unpickled
    return json.loads(out.with_suffix(".json").read_text()), output


def run(args: argparse.Namespace) -> dict:
    results: dict[str, dict[str, dict]] = {}
    names = args.only.split(",") if args.only else list(STAGES)
    with tempfile.TemporaryDirectory(prefix="triptych-cpu-stages-") as tmp:
        for name in names:
            stage = STAGES[name]
            outputs: dict[str, torch.Tensor] = {}
            results[name] = {}
            for setting in stage.settings:
                row: dict[str, Any] = {}
                if args.settings and setting not in args.settings.split(","):
                    continue
                if args.skip_compile and "compile" in setting:
                    row["skipped"] = "--skip-compile"
                elif name == "t5-xxl" and setting == "float32" and not args.tiny:
                    row["skipped"] = T5_XXL_FP32_NOTE
                elif not args.tiny and available_gb() < stage.need_gb:
                    row["skipped"] = f"needs ~{stage.need_gb:.0f} GB, {available_gb():.1f} GB available"
                if row:
                    results[name][setting] = row
                    print(f"{name} {setting}: {row['skipped']}", flush=True)
                    continue
                print(f"{name} {setting}: running (available {available_gb():.1f} GB)", flush=True)
                try:
                    if args.tiny:
                        row, output = run_setting(name, setting, args)
                    else:
                        row, output = in_subprocess(name, setting, args, Path(tmp))
                except RuntimeError as exc:  # one setting failing (out of memory...) leaves the others
                    results[name][setting] = {"skipped": str(exc)}
                    print(f"{name} {setting}: {results[name][setting]['skipped']}", flush=True)
                    continue
                outputs[setting] = output
                results[name][setting] = row
                print(f"{name} {setting}: {row['median_s']:.2f} s, peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
            reference = "float32" if "float32" in outputs else "bfloat16"
            for setting, output in outputs.items():
                row = results[name][setting]
                row["quality_against"] = reference
                if setting != reference:
                    measure = cosine if stage.kind == "encoder" else psnr
                    row.update(measure(output, outputs[reference]))
                base = results[name].get("float32", {}).get("median_s")
                row["speedup_vs_fp32_eager"] = base / row["median_s"] if base else None
    return results


def report(results: dict, args: argparse.Namespace) -> None:
    rows = []
    for name, settings in results.items():
        for setting, row in settings.items():
            if "skipped" in row:
                rows.append([name, setting, "-", "-", "-", "-", row["skipped"]])
                continue
            if "psnr_db" in row:
                quality = f"PSNR {row['psnr_db']:.1f} dB vs {row['quality_against']}"
            elif "cosine_min" in row:
                quality = (
                    f"cosine min {row['cosine_min']:.5f} mean {row['cosine_mean']:.5f} vs {row['quality_against']}"
                )
            else:
                quality = "reference"
            speedup = row["speedup_vs_fp32_eager"]
            rows.append(
                [
                    name,
                    setting,
                    row["median_s"],
                    "-" if speedup is None else f"{speedup:.2f}x",
                    row["model_rss_gb"],
                    row["peak_rss_gb"],
                    quality,
                ]
            )
    size = "tiny configs" if args.tiny else f"VAEs at {args.size}x{args.size}, T5 {args.t5_tokens} tokens, CLIP 77"
    print(f"{size}; median of {args.repeat} timed call(s); compile settings after one untimed (compiling) call")
    print(table(["stage", "setting", "s", "x fp32 eager", "model RSS GB", "peak RSS GB", "quality"], rows))
    for name, settings in results.items():
        for setting, row in settings.items():
            if "skipped" in row or setting == row.get("quality_against"):
                continue
            speed = row["speedup_vs_fp32_eager"]
            against = "no fp32 run" if speed is None else f"{speed:.2f}x diffusers' fp32 eager"
            quality = f"PSNR {row['psnr_db']:.1f} dB" if "psnr_db" in row else f"cosine min {row['cosine_min']:.4f}"
            print(
                f"result: {name} {setting}: {row['median_s']:.3f} s, {against}, {quality} vs {row['quality_against']}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", "--smoke", action="store_true", help="miniature configs in this process")
    parser.add_argument("--only", help=f"comma-separated stages (default all: {','.join(STAGES)})")
    parser.add_argument("--size", type=int, default=1024, help="decoded image side in pixels (default 1024)")
    parser.add_argument("--t5-tokens", type=int, default=512, help="T5 tokens (default 512, FLUX.1's length)")
    parser.add_argument("--repeat", type=int, default=1, help="timed calls per setting (default 1)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls of eager full-size settings (default 0)")
    parser.add_argument("--settings", help="comma-separated settings to run (default: each stage's all)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile settings")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # STAGE:SETTING, run in this process (full size)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        name, setting = args.one.split(":", 1)
        row, output = run_setting(name, setting, args)
        from safetensors.torch import save_file

        save_file({"output": output.contiguous()}, Path(args.out).with_suffix(".safetensors"))
        Path(args.out).with_suffix(".json").write_text(json.dumps(row))
        return 0
    if args.tiny:
        torch.set_num_threads(1)  # miniature models are all per-op overhead
    info = machine()
    print(f"cpu_stages benchmark | {describe(info)}", flush=True)
    results = run(args)
    report(results, args)
    mode = "tiny" if args.tiny else "full"
    write_json(args.json, {"benchmark": "cpu_stages", "mode": mode, "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
