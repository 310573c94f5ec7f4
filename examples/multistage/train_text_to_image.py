#!/usr/bin/env python
"""Fine-tune a Stable Diffusion U-Net on captioned images as a multi-stage multi-decoder U-Net or as experts.

The shape of diffusers' `examples/text_to_image/train_text_to_image.py`: `--pretrained_model_name_or_path` names a
`StableDiffusionPipeline` folder (or Hub repository), `--train_data_dir` an image folder with a `metadata.jsonl`
(`{"file_name": ..., "text": ...}` per line; `--caption_column` names the caption key) or `--dataset_name` a
`datasets` dataset; the VAE and the text encoder stay frozen. `--method multistage` trains a
`MultiStageUNet2DConditionModel` (one shared encoder, one decoder per stage), `--method experts` one
`UNet2DConditionModel` per stage inside an `ExpertRoutingModel`; a plain source U-Net is warm-started exactly (every
decoder or expert a copy of it), a staged or routed one keeps its stages. Every batch is stratified over the stages.
`--use_ema` keeps an EMA (saved as `unet_ema` in the checkpoints, and the final pipeline's weights, as diffusers
does); `--checkpointing_steps`, `--checkpoints_total_limit` and `--resume_from_checkpoint latest|PATH` resume exactly.
`--validation_prompts` are sampled every `--save_images_steps` (default: the first captions). The output is a
`StableDiffusionPipeline` folder that `StableDiffusionPipeline.from_pretrained` reloads.

    accelerate launch examples/multistage/train_text_to_image.py --pretrained_model_name_or_path sd-1.5 \\
        --train_data_dir captioned --resolution 512 --center_crop --random_flip --use_ema --method multistage \\
        --stage_boundaries 442 631 --train_batch_size 4 --max_train_steps 15000 --learning_rate 1e-5 \\
        --lr_scheduler constant --lr_warmup_steps 0 --validation_prompts "a photo of a cat" --output_dir sd-staged
"""

import argparse

from diffusers_stages.training import build_parser, build_task, parse_and_check, train
from diffusers_stages.training.tasks.text_to_image import METHODS, TextToImageTask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(
        __doc__,
        "for a plain source unet, the paper's 442 631 (`--method multistage`) or the middle timestep "
        "(`--method experts`), scaled to the source's schedule; a staged or routed source keeps its own (refused)",
    )
    # diffusers' text-to-image defaults; `--class_dropout_prob` is the rate of captions replaced by the empty one; the
    # source pipeline gives the U-Net, the VAE and the noise schedule (options that would choose them are refused;
    # `text_to_image.SOURCE_OPTIONS`, unset by default in the shared parser)
    parser.set_defaults(
        resolution=512, learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500, class_dropout_prob=0.0,
        adam_beta1=0.9, adam_weight_decay=1e-2,
        prediction_type=None, output_dir="sd-model-finetuned-stages", ddpm_beta_schedule=None,
        num_train_timesteps=None, ema_inv_gamma=None, ema_power=None,
    )  # fmt: skip
    # the shared parser's help texts that describe other data or a model built from the arguments
    helps = {
        "--train_data_dir": "An image folder with a metadata.jsonl (one `file_name` and caption, under "
        "`--caption_column`, per line), as diffusers' train_text_to_image.py reads it. Every image is decoded once "
        "before training: one that is not a readable image stops the run, named.",
        "--image_column": "The image column of `--dataset_name` (refused with `--train_data_dir`).",
        "--class_dropout_prob": "Rate of captions replaced by the empty one (classifier-free guidance).",
        "--prediction_type": "Default: the source scheduler's; another is refused (the prediction type is the "
        "model's).",
        "--use_ema": "Keep an exponential moving average of the U-Net's weights, as diffusers' train_text_to_image.py: "
        "decay (1 + step) / (10 + step), up to `--ema_max_decay`; saved in the checkpoints and as the final pipeline's "
        "weights; the sample grids are drawn with it.",
        "--ema_inv_gamma": "Refused: it shapes train_unconditional.py's EMA warmup, which this script does not use.",
        "--ema_power": "Refused: it shapes train_unconditional.py's EMA warmup, which this script does not use.",
    }
    for option, text in helps.items():
        parser._option_string_actions[option].help = text
    group = parser.add_argument_group("text-to-image")
    group.add_argument(
        "--pretrained_model_name_or_path", type=str, required=True,
        help="A StableDiffusionPipeline folder or Hub repository; its unet is a UNet2DConditionModel (converted), a "
        "MultiStageUNet2DConditionModel (`--method multistage`) or an ExpertRoutingModel (`--method experts`). "
        "It gives the VAE, the noise schedule and the prediction type; the shape and schedule arguments are "
        "refused unless they repeat the source's.",
    )  # fmt: skip
    group.add_argument("--method", choices=METHODS, default="multistage",
                       help="multistage: one shared encoder, one decoder per stage; experts: one U-Net per stage.")  # fmt: skip
    group.add_argument("--caption_column", type=str, default="text", help="The caption key of metadata.jsonl or column of the dataset.")  # fmt: skip
    group.add_argument(
        "--validation_prompts", type=str, nargs="+", default=None,
        help="Prompts of the sample grids (every `--save_images_steps` and at the end), at most `--num_sample_images` "
        "(image i samples prompt i modulo their number); default: the first captions.",
    )  # fmt: skip
    group.add_argument("--train_decoders_only", action="store_true", help="Freeze the shared encoder (multistage).")
    return parse_and_check(parser, TextToImageTask, argv)


def main(args: argparse.Namespace) -> str:
    return train(args, build_task(TextToImageTask, args))


if __name__ == "__main__":
    main(parse_args())
