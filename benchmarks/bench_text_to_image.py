"""Cost of a staged Stable Diffusion U-Net (`MultiStageUNet2DConditionModel`) against the plain `UNet2DConditionModel`,
and of its routing inside diffusers' own `StableDiffusionPipeline`.

Everything is measured in one run and printed as ratios to the baseline measured in that same run:

1. FLOPs of one U-Net call (classifier-free guidance batch of 2, one timestep per stage), of one training step on a
   batch stratified over the stages (forward + backward), and of one pipeline sampling run (DDIM, guidance 7.5):
   the plain U-Net, the exact warm start (`from_unet`: every decoder a copy of its up path) and a staged model with
   tailored decoders (x1.5 / x1 / x0.5 of the encoder's widths for `[0, 442)` / `[442, 631)` / `[631, 1000]`).
2. Median wall times (interleaved repeats) of the same U-Net calls and of a whole pipeline run; the warm start's
   pipeline time against the plain U-Net's is the routing overhead inside `StableDiffusionPipeline` (target < 1%).
3. The routing's own cost, measured where it is largest against the network's: the warm start of a tiny SD-layout
   U-Net (8x8 latents, widths 32/64) against its source, on the same input, in many interleaved CPU-time repeats
   (`--routing_repeats`, medians; the machine's other jobs barely move CPU time). The difference is the staged
   model's extra time per call (timestep lookup, decoder selection), which is then given as a share of this run's
   pipeline time: `extra per call x U-Net calls per run / pipeline run time`, the overhead that item 2 cannot
   resolve below the machine's noise.

The U-Net has Stable Diffusion 1.5's layout (`CrossAttnDownBlock2D` x3 + `DownBlock2D`, 2 layers per block, 8 heads,
77 text tokens) scaled down to run on a CPU: block widths (320, 640, 1280, 1280) / 5 = (64, 128, 256, 256),
cross-attention width 768 / 3 = 256, 32x32 latents (SD 1.5: 64x64). The text encoder (2-layer, 256-wide CLIP) and
the VAE (16 channels, 8x down-sampling) are small and the same for every variant.

Attention: FLOPs are counted with diffusers' `AttnProcessor` (explicit `baddbmm`/`bmm` matrix products); the package's
`count_flops` also counts `scaled_dot_product_attention` on CPU (which torch's counter alone counts as 0), and gives the
same figure for the default SDPA processor (tested); wall times use the default SDPA.

    python benchmarks/bench_text_to_image.py --threads 1   # CPU, about 10 minutes on one idle core
    python benchmarks/bench_text_to_image.py --quick       # fewer repeats and steps, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from diffusers_stages import MultiStageUNet2DConditionModel
from diffusers_stages.conventions import DEFAULT_STAGE_BOUNDARIES
from diffusers_stages.timestep_sampling import stratified_timesteps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.bench_multistage import training_step
from benchmarks.measure import count_flops, default_device, device_option, interleaved_medians, positive_int

SCALE = 5  # SD 1.5's block widths divided by this
SD15_WIDTHS = (320, 640, 1280, 1280)
DECODER_FACTORS = (1.5, 1.0, 0.5)  # tailored decoders, clean stage first
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent_size", type=positive_int, default=32, help="latent side (SD 1.5: 64)")
    parser.add_argument("--steps", type=positive_int, default=20, help="DDIM steps of a pipeline run")
    parser.add_argument("--train_batch", type=positive_int, default=6)
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed repetitions (medians are reported)")
    parser.add_argument("--routing_repeats", type=positive_int, default=400, help="timed calls per model in section 3")
    parser.add_argument("--quick", action="store_true", help="2 repeats and 4 steps")
    parser.add_argument("--device", type=device_option, default=default_device())
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.quick:  # defaults only: the options given with it keep their values
        parser.set_defaults(repeats=2, steps=4, routing_repeats=20)
        args = parser.parse_args(argv)
    return args


def unet_kwargs(latent_size: int) -> dict:
    """Stable Diffusion 1.5's U-Net layout with widths / `SCALE` and a 256-wide cross-attention."""
    return dict(
        sample_size=latent_size,
        block_out_channels=tuple(w // SCALE for w in SD15_WIDTHS),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=256,
        attention_head_dim=8,
    )


def text_components(folder: str):
    """A CLIP tokenizer over a small vocabulary written to ``folder`` and a 2-layer 256-wide text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [f"{c}</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer, CLIPTextModel(config).eval()


def small_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    ).eval()  # fmt: skip


def main(args: argparse.Namespace) -> list[tuple[str, dict[str, float], float, str]]:
    """Measure and print the table; returns its rows ``(measure, {variant: value}, unit size, unit)``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    kwargs = unet_kwargs(args.latent_size)
    plain = UNet2DConditionModel(**kwargs).to(device).eval()
    warm = MultiStageUNet2DConditionModel.from_unet(plain, DEFAULT_STAGE_BOUNDARIES).to(device).eval()
    widths = tuple(tuple(round(w * f) for w in kwargs["block_out_channels"]) for f in DECODER_FACTORS)
    tailored = MultiStageUNet2DConditionModel(**kwargs, decoder_block_out_channels=widths).to(device).eval()
    models = {"plain": plain, "warm start": warm, "tailored": tailored}
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
    print(
        f"device {device} ({torch.get_num_threads()} threads); SD 1.5 layout / {SCALE}: widths "
        f"{kwargs['block_out_channels']}, {args.latent_size}x{args.latent_size} latents, 77 text tokens; "
        f"tailored decoders {widths}; parameters (M): "
        + ", ".join(f"{name} {count:.2f}" for name, count in params.items())
    )

    # the pipelines: the same text encoder, tokenizer, VAE and scheduler around each U-Net
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, text_encoder = text_components(folder)
    vae = small_vae()
    pipes = {}
    for name, unet in models.items():
        pipes[name] = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).to(device)  # fmt: skip
        pipes[name].set_progress_bar_config(disable=True)

    def sample(name):
        generator = torch.Generator().manual_seed(0)
        return pipes[name]("a cat", num_inference_steps=args.steps, generator=generator, output_type="np").images

    latents = torch.randn(2, 4, args.latent_size, args.latent_size, device=device)
    text = torch.randn(2, 77, kwargs["cross_attention_dim"], device=device)
    stage_times = [torch.tensor(t, device=device) for t in (200, 500, 800)]  # one per stage
    rows = []

    # 1. FLOPs with explicit-matmul attention (counted), then back to the default processors
    for model in models.values():
        model.set_attn_processor(AttnProcessor())
    with torch.inference_mode():
        for s, t in enumerate(stage_times):
            flops = {n: count_flops(lambda m=m, t=t: m(latents, t, text))[0] for n, m in models.items()}
            rows.append((f"U-Net call FLOPs, batch 2, t={int(t)} (stage {s})", flops, 1e9, "GFLOP"))
        flops = {n: count_flops(lambda n=n: sample(n))[0] for n in models}
        rows.append((f"pipeline run FLOPs (DDIM {args.steps} steps, guidance 7.5)", flops, 1e9, "GFLOP"))
    batch = torch.randn(args.train_batch, 4, args.latent_size, args.latent_size, device=device)
    timesteps = stratified_timesteps(warm.partition, args.train_batch, generator=torch.manual_seed(0))[0].to(device)
    text_batch = torch.randn(args.train_batch, 77, kwargs["cross_attention_dim"], device=device)
    flops = {
        n: count_flops(lambda m=m: training_step(m, batch, timesteps, encoder_hidden_states=text_batch))[0]
        for n, m in models.items()
    }
    rows.append((f"training step FLOPs (batch {args.train_batch} over the 3 stages)", flops, 1e9, "GFLOP"))
    for model in models.values():
        model.set_default_attn_processor()  # SDPA (AttnProcessor2_0) for the wall times

    # 2. wall times: U-Net calls (each stage), then whole pipeline runs
    with torch.inference_mode():
        for s, t in enumerate(stage_times):
            fns = {n: (lambda m=m, t=t: m(latents, t, text)) for n, m in models.items()}
            times = interleaved_medians(fns, args.repeats * 2, device, warmup=1)
            rows.append((f"U-Net call wall time, batch 2, stage {s} (median)", times, 1e-3, "ms"))
    times = interleaved_medians({n: (lambda n=n: sample(n)) for n in models}, args.repeats, device, warmup=1)
    rows.append((f"pipeline run wall time, DDIM {args.steps} steps (median)", times, 1e-3, "ms"))

    print("\n| measure | UNet2DConditionModel | warm start (ratio) | tailored (ratio) |\n|---|---|---|---|")
    for name, values, unit_size, unit in rows:
        base = values["plain"]
        cells = [f"{values[n] / unit_size:.3f} {unit} ({values[n] / base:.4f})" for n in ("warm start", "tailored")]
        print(f"| {name} | {base / unit_size:.3f} {unit} | {cells[0]} | {cells[1]} |")
    overhead = times["warm start"] / times["plain"] - 1
    print(
        f"\nrouting overhead inside StableDiffusionPipeline (warm start vs plain, same FLOPs): {100 * overhead:+.2f}%"
    )

    # 3. the routing's own cost per call (a tiny model, where it weighs most), as a share of this run's pipeline time
    extra, noise = routing_cost_per_call(args.routing_repeats, device)
    share = extra * args.steps / times["warm start"]
    print(
        f"routing cost per U-Net call (tiny SD-layout U-Net, warm start - plain, paired CPU time, median of "
        f"{args.routing_repeats} rounds): {1e6 * extra:+.1f} us (noise floor, a copy of the plain U-Net: "
        f"{1e6 * noise:+.1f} us); x {args.steps} calls / pipeline run of {times['warm start']:.3f} s: "
        f"{100 * share:+.4f}% of the run"
    )
    rows.append(("routing cost per U-Net call (tiny U-Net, CPU time)", {"plain": 1.0, "extra": extra}, 1e-6, "us"))
    return rows


def routing_cost_per_call(repeats: int, device: str | torch.device) -> tuple[float, float]:
    """The staged model's extra CPU seconds per call: the warm start of a tiny SD-layout U-Net minus its source, on
    the same input (batch 2, one timestep: the guidance batch), as the median of paired differences; and the same
    for a copy of the source (the measurement's noise floor)."""
    torch.manual_seed(0)
    plain = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
    ).to(device).eval()  # fmt: skip
    copy = UNet2DConditionModel.from_config(plain.config).to(device).eval()
    copy.load_state_dict(plain.state_dict())
    warm = MultiStageUNet2DConditionModel.from_unet(plain, DEFAULT_STAGE_BOUNDARIES).to(device).eval()
    latents, text = torch.randn(2, 4, 8, 8, device=device), torch.randn(2, 7, 32, device=device)
    t = torch.tensor(500, device=device)
    with torch.inference_mode():
        fns = {
            name: (lambda m=m: m(latents, t, text)) for name, m in (("plain", plain), ("copy", copy), ("warm", warm))
        }
        differences = interleaved_medians(fns, repeats, device, warmup=10, clock=time.process_time, baseline="plain")
    return differences["warm"], differences["copy"]


if __name__ == "__main__":
    main(parse_args())
