#!/usr/bin/env python
"""Fine-tune a staged Stable Diffusion U-Net (`MultiStageUNet2DConditionModel`) on captioned images with Accelerate.

The source is a `StableDiffusionPipeline` folder whose ``unet`` is a plain `UNet2DConditionModel` (converted here,
every decoder a copy of its up path, with `--stage_boundaries`) or already a `MultiStageUNet2DConditionModel` (its
stages are kept). Every batch is stratified over the stages, so every decoder trains at every step; the VAE and the
text encoder stay frozen. The result is the same kind of folder, loadable with `StableDiffusionPipeline`.

    accelerate launch examples/text_to_image/train_text_to_image_multistage.py --pretrained_model_name_or_path sd \\
        --train_data_dir captioned --stage_boundaries 442 631 --max_train_steps 1000 --output_dir sd-multistage

``--train_data_dir`` holds images and a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` per line
(the `datasets` image-folder convention).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from diffusers_stages import MultiStageUNet2DConditionModel
from diffusers_stages.timestep_sampling import stratified_timesteps
from diffusers_stages.training import diffusion_loss
from diffusers_stages.training.data import preprocess_image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="A StableDiffusionPipeline folder.")
    parser.add_argument("--train_data_dir", required=True, help="Images plus metadata.jsonl (file_name, text).")
    parser.add_argument("--output_dir", required=True, help="Where the fine-tuned pipeline folder is written.")
    parser.add_argument(
        "--stage_boundaries", type=float, nargs="+", default=None,
        help="Stage boundaries in training timesteps for a plain source unet (default 442 631); refused for a source "
        "that is already staged (its stages are kept).",
    )  # fmt: skip
    parser.add_argument(
        "--stage_shares", type=float, nargs="+", default=None,
        help="Share of each stage in every batch, clean stage first (default: uniform over timesteps).",
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default: the pipeline's).")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--train_decoders_only", action="store_true", help="Freeze the shared encoder.")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("train_batch_size", "max_train_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {getattr(args, name)}.")
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be a positive number, got {args.learning_rate}.")
    return args


def captioned_images(folder: str) -> list[tuple[str, str]]:
    """``(image path, caption)`` pairs from ``folder/metadata.jsonl``; a missing file or key is a `ValueError`."""
    index = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(index):
        raise ValueError(f"`--train_data_dir` must hold a metadata.jsonl (file_name, text per line), got {folder}.")
    records = []
    with open(index, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                entry = json.loads(line)
                if not isinstance(entry, dict) or not {"file_name", "text"} <= entry.keys():
                    raise ValueError(f"{index} line {number} must have `file_name` and `text`, got {line.strip()!r}.")
                records.append((os.path.join(folder, entry["file_name"]), str(entry["text"])))
    if not records:
        raise ValueError(f"{index} lists no images.")
    return records


def staged_unet(pipe: StableDiffusionPipeline, boundaries: list[float] | None) -> MultiStageUNet2DConditionModel:
    """The source's unet as a staged model: converted (exact warm start) or kept as it is."""
    if isinstance(pipe.unet, MultiStageUNet2DConditionModel):
        if boundaries is not None:
            raise ValueError(
                "`--stage_boundaries` is refused: the source unet is already staged at "
                f"{list(pipe.unet.partition.boundaries)} and keeps its stages."
            )
        return pipe.unet
    if type(pipe.unet) is not UNet2DConditionModel:
        raise ValueError(f"The source unet must be a UNet2DConditionModel, got {type(pipe.unet).__name__}.")
    steps = pipe.scheduler.config.get("num_train_timesteps", 1000)
    return MultiStageUNet2DConditionModel.from_unet(pipe.unet, boundaries or (442, 631), num_train_timesteps=steps)


def main(args: argparse.Namespace) -> str:
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)

    # 1. the source pipeline (safetensors only), its staged unet, and the training noise scheduler
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, use_safetensors=True)
    unet = staged_unet(pipe, args.stage_boundaries).train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # same betas and prediction type
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    trained = unet.decoders if args.train_decoders_only else unet
    unet.requires_grad_(False)
    trained.requires_grad_(True)

    # 2. data: images at the pipeline's resolution, captions tokenized to the text encoder's length
    resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    records = captioned_images(args.train_data_dir)
    pixels = torch.stack([preprocess_image(Image.open(path), resolution, True, None) for path, _ in records])
    tokens = pipe.tokenizer(
        [caption for _, caption in records],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(pixels, tokens),
        batch_size=args.train_batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.learning_rate)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    pipe.vae.to(accelerator.device)
    pipe.text_encoder.to(accelerator.device)

    # 3. the loop: frozen VAE/text encoder, batches stratified over the stages, one loss for all decoders
    partition = accelerator.unwrap_model(unet).partition
    step = 0
    while step < args.max_train_steps:
        for images, ids in loader:
            with torch.no_grad():
                latents = pipe.vae.encode(images.to(pipe.vae.dtype)).latent_dist.sample(generator=generator)
                latents = latents * pipe.vae.config.scaling_factor
                text = pipe.text_encoder(ids)[0]
            timesteps, stages = stratified_timesteps(partition, latents.shape[0], args.stage_shares, generator)
            losses = diffusion_loss(
                unet,
                noise_scheduler,
                latents,
                timesteps.to(latents.device),
                model_kwargs={"encoder_hidden_states": text},
                generator=generator if latents.device.type == "cpu" else None,
            )
            accelerator.backward(losses.mean())
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            per_stage = {int(s): round(losses[stages == s].mean().item(), 4) for s in stages.unique()}
            accelerator.print(f"step {step}: loss {losses.mean().item():.4f}, per stage {per_stage}")
            if step >= args.max_train_steps:
                break

    # 4. save the same pipeline class with the fine-tuned staged unet
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(unet).eval()
        components = {**pipe.components, "unet": unet}
        requires_safety_checker = pipe.config.requires_safety_checker
        StableDiffusionPipeline(**components, requires_safety_checker=requires_safety_checker).save_pretrained(
            args.output_dir
        )
    return args.output_dir


if __name__ == "__main__":
    main(parse_args())
