"""Shared tiny components for the test suite (channels (8, 16), 8-16 px)."""

import diffusers
import pytest
import torch
from diffusers.utils import logging
from torch.utils._python_dispatch import TorchDispatchMode

logging.set_verbosity_error()  # keep expected warnings (e.g. deliberate key mismatches) out of the test log
# the test models are tiny, so every op is overhead-bound: one thread is faster than two on CI's 2 cores, and far
# faster when the cores are shared (subprocess tests set their own threads)
torch.set_num_threads(1)

# every scheduler the pipelines are tested with (EDM schedulers need "sigma"-unit models)
SCHEDULERS = [
    getattr(diffusers, name)
    for name in (
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LMSDiscreteScheduler",
        "DEISMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "EDMEulerScheduler",
    )
]

# a latent-diffusion schedule (scaled_linear, LDM's betas): nothing like the training scripts' default linear one, so
# a fine-tuning run that kept it is told from one that did not
LDM_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}

TINY_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=4,
)


@pytest.fixture
def tiny_unet_kwargs() -> dict:
    """Keyword arguments of a tiny `UNet2DModel` (also the encoder vocabulary of `MultiStageUNet2DModel`)."""
    return dict(TINY_UNET)


@pytest.fixture
def tiny_multistage():
    """A tiny 3-stage `MultiStageUNet2DModel` with tailored decoders (wide, encoder-wide, narrow)."""
    from diffusers_stages import MultiStageUNet2DModel

    torch.manual_seed(0)
    return MultiStageUNet2DModel(
        **TINY_UNET, stage_boundaries=(442, 631), decoder_block_out_channels=((16, 24), (8, 16), (4, 8))
    ).eval()


# ---------------------------------------------------------------------------------------------------------------
# tiny text-to-image components (Stable Diffusion 1.x/2.x and SDXL layouts), built in code as diffusers' tests do
TINY_COND_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=32,
    attention_head_dim=2,
)
# SDXL: two text encoders (32 + 32 wide), added text/time embedding (6 time ids of 8 + a 32-wide pooled embedding)
TINY_SDXL_UNET = dict(
    TINY_COND_UNET,
    cross_attention_dim=64,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)


def _tiny_cond_unet(seed: int = 0, sdxl: bool = False, **overrides):
    """A tiny `UNet2DConditionModel` (SD layout, or SDXL's with ``sdxl=True``)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**(TINY_SDXL_UNET if sdxl else TINY_COND_UNET), **overrides}).eval()


@pytest.fixture
def tiny_cond_unet():
    """The builder ``tiny_cond_unet(seed=0, sdxl=False, **overrides)`` of tiny `UNet2DConditionModel`s."""
    return _tiny_cond_unet


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A `CLIPTokenizer` over the 26 letters (each alone or word-final), from files written here: no download."""
    import json

    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [f"{c}</w>" for c in letters] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_text_encoder(tokenizer, seed: int, with_projection: bool = False):
    """A 2-layer, 32-wide CLIP text encoder for ``tokenizer`` (``CLIPTextModelWithProjection`` for SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        max_position_embeddings=tokenizer.model_max_length,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_vae():
    """A tiny `AutoencoderKL` (4 latent channels, downsampling by 2: 8 px latents are 16 px images)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


@pytest.fixture
def tiny_sd_components(tiny_tokenizer) -> dict:
    """The components of a tiny `StableDiffusionPipeline` (no safety checker), with a DDIM scheduler."""
    return {
        "unet": _tiny_cond_unet(0),
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(tiny_tokenizer, 1),
        "tokenizer": tiny_tokenizer,
        "scheduler": diffusers.DDIMScheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def with_safety_checker(components: dict) -> dict:
    """Stable Diffusion 1.x's components: a tiny safety checker and its feature extractor added."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 4}, projection_dim=32)
    return {
        **components,
        "safety_checker": StableDiffusionSafetyChecker(config).eval(),
        "feature_extractor": CLIPImageProcessor(crop_size=32, size=32),
        "requires_safety_checker": True,
    }


@pytest.fixture
def tiny_sdxl_components(tiny_tokenizer) -> dict:
    """The components of a tiny `StableDiffusionXLPipeline`, with a DDIM scheduler."""
    return {
        "unet": _tiny_cond_unet(0, sdxl=True),
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(tiny_tokenizer, 1),
        "text_encoder_2": tiny_text_encoder(tiny_tokenizer, 2, with_projection=True),
        "tokenizer": tiny_tokenizer,
        "tokenizer_2": tiny_tokenizer,
        "scheduler": diffusers.DDIMScheduler(),
    }


SMALL_UNET = dict(  # the smallest U-Net of two levels without attention (loading and assembling tests)
    sample_size=8,
    block_out_channels=(8, 8),
    norm_num_groups=4,
    layers_per_block=1,
    down_block_types=("DownBlock2D",) * 2,
    up_block_types=("UpBlock2D",) * 2,
)


def corrupt_weights(path, corruption: str, outside=None) -> str:
    """Corrupt the safetensors file ``path`` as a hostile folder would: ``"missing"`` drops its first tensor,
    ``"integers"`` stores it as integers, ``"link"`` makes the file a link to a copy in ``outside`` (default: beside
    the file's folder). Returns the first tensor's name (what the loader's error must name; for a link it says the
    file is ``outside``)."""
    import os

    from safetensors.torch import load_file, save_file

    state = load_file(path)
    key = sorted(state)[0]
    if corruption == "link":
        elsewhere = os.path.join(outside or os.path.dirname(os.path.dirname(path)), "elsewhere.safetensors")
        os.rename(path, elsewhere)
        os.symlink(elsewhere, path)
    elif corruption == "integers":
        save_file({**state, key: state[key].int()}, path)
    elif corruption == "missing":
        save_file({k: v for k, v in state.items() if k != key}, path)
    else:
        raise ValueError(f"`corruption` must be 'missing', 'integers' or 'link', got {corruption!r}.")
    return key


# what reading a tensor value on the host dispatches to (`.item()`, `bool(tensor)`, `if tensor:`): a device
# synchronisation on an accelerator, and a data-dependent branch (graph break) under `torch.compile`
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    """``host_reads(fn)``: call ``fn()`` and return the number of tensor values it read on the host."""

    def count(fn) -> int:
        with _HostReads() as mode:
            fn()
        return len(mode.reads)

    return count
