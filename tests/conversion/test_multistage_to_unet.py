"""One stage of a MultiStagePipeline -> a plain diffusers UNet2DModel folder."""

import os

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file

from diffusers_stages import MultiStagePipeline
from diffusers_stages.conversion import multistage_to_unet


def export(source, output, stage, *extra):
    args = multistage_to_unet.parse_args(["--source", source, "--stage", str(stage), "--output_path", output, *extra])
    return multistage_to_unet.main(args)


@pytest.fixture
def staged_folder(tmp_path, tiny_multistage):
    with torch.no_grad():  # make the decoders differ, as after training
        for p in tiny_multistage.decoders.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = str(tmp_path / "staged")
    MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def test_stage_with_encoder_widths_exports_to_an_equal_unet(staged_folder, tmp_path, tiny_multistage, capsys):
    out = str(tmp_path / "stage1")
    export(staged_folder, out, 1, "--verify", "--tolerance", "0")
    assert "max |source - converted| = 0.000e+00" in capsys.readouterr().out
    unet = UNet2DModel.from_pretrained(out)  # plain diffusers reads it
    x = torch.randn(2, 3, 8, 8)
    for t in (450, 600):
        assert torch.equal(unet(x, t).sample, tiny_multistage(x, t, stage_index=1).sample)
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))


def test_tailored_stage_is_refused_with_the_reason(staged_folder, tmp_path):
    for stage in (0, 2):
        with pytest.raises(ValueError, match=f"Stage {stage}'s decoder has widths .* not the encoder's"):
            export(staged_folder, str(tmp_path / "out"), stage)
    with pytest.raises(ValueError, match=r"`stage` must be an integer in \[0, 3\), got 3"):
        export(staged_folder, str(tmp_path / "out"), 3)
    assert not (tmp_path / "out").exists()


def test_stage_attending_with_its_own_heads_is_refused_and_one_with_the_encoders_exports(tiny_cond_unet):
    from diffusers_stages import MultiStageUNet2DConditionModel
    from diffusers_stages.conversion.multistage_to_unet import multistage_stage_to_unet

    source = tiny_cond_unet(0)  # 2 heads per block; its first up block attends
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    staged = MultiStageUNet2DConditionModel(
        **config, stage_boundaries=(500,), decoder_skip_adapters=False, decoder_attention_head_dim=(4, 2)
    ).eval()
    with pytest.raises(ValueError, match=r"Stage 0's decoder attends with \[4, 4\] heads per block, not the encoder"):
        multistage_stage_to_unet(staged, 0)  # same weights, other heads: a plain U-Net would differ silently
    unet = multistage_stage_to_unet(staged, 1)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(unet(x, 700, text).sample, staged(x, 700, text).sample, atol=1e-6)


def test_a_source_config_that_is_not_a_json_object_is_named(staged_folder, tmp_path):
    with open(os.path.join(staged_folder, "unet", "config.json"), "w", encoding="utf-8") as f:
        f.write("[1]")
    with pytest.raises(ValueError, match="config.json"):
        export(staged_folder, str(tmp_path / "out"), 0)


def test_a_pipeline_without_a_unet_is_named_with_where_its_plain_models_are(tmp_path):
    """An expert-routing folder has no `unet`: the error named diffusers' `subfolder` argument, which the command
    does not have; it names the pipeline and where its plain U-Nets are."""
    from diffusers import DDPMScheduler

    from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline
    from tests.conversion.conftest import tiny_unet

    experts = ExpertRoutingModel([tiny_unet(0), tiny_unet(1)], stage_boundaries=(500,))
    source = str(tmp_path / "routed")
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler()).save_pretrained(source)
    with pytest.raises(ValueError, match=r"holds a 'ExpertRoutingPipeline' without a `unet`.*experts/expert_<i>") as e:
        export(source, str(tmp_path / "out"), 0)
    assert "subfolder" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_stage_with_an_adapter_loaded_is_refused_by_name(tiny_cond_unet):
    # its state dict has the LoRA-wrapped layers' names (`to_q.base_layer.weight`) or the IP-Adapter's weights
    # (`encoder_hid_proj.*`, `processor.to_k_ip.*`): the plain U-Net's strict load failed with a RuntimeError listing
    # every key
    from peft import LoraConfig

    from diffusers_stages import MultiStageUNet2DConditionModel
    from diffusers_stages.conversion.multistage_to_unet import multistage_stage_to_unet
    from tests.pipelines.test_ip_adapter import ip_adapter_state_dict

    source = tiny_cond_unet(0)
    staged = MultiStageUNet2DConditionModel.from_unet(source, stage_boundaries=(500,))
    torch.manual_seed(0)
    staged.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["to_q", "to_v"]), "style")
    with pytest.raises(ValueError, match=r"`model` has LoRA adapters loaded \(\['style'\]\).*fuse_lora"):
        multistage_stage_to_unet(staged, 1)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = staged(x, 700, text).sample
        staged.fuse_lora()  # the way the message gives: the LoRA baked in
        staged.unload_lora()
        assert torch.allclose(multistage_stage_to_unet(staged, 1)(x, 700, text).sample, expected, atol=1e-5)
    staged._load_ip_adapter_weights([ip_adapter_state_dict(source)])
    with pytest.raises(ValueError, match="`model` has an IP-Adapter loaded.*unload_ip_adapter"):
        multistage_stage_to_unet(staged, 1)


@pytest.mark.parametrize(
    "conditional, overrides",
    [
        (True, {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 6}),  # SD unCLIP's
        (True, {"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 6}),
        (True, {"class_embed_type": "timestep"}),
        (True, {"class_embed_type": "identity"}),
        (True, {"num_class_embeds": 10}),
        (False, {"class_embed_type": "timestep"}),
        (False, {"class_embed_type": "identity"}),
    ],
    ids=["cond-projection", "cond-simple_projection", "cond-timestep", "cond-identity", "cond-table", "timestep",
         "identity"],
)  # fmt: skip
def test_verify_gives_the_labels_every_class_embedding_takes(tmp_path, tiny_cond_unet, conditional, overrides, capsys):
    # `--verify` gave class labels only to a `num_class_embeds` table: a stage of any other class embedding (SD
    # unCLIP's projection, a timestep or identity one) failed with "`class_labels` must be given" and wrote nothing
    from diffusers_stages import MultiStageUNet2DConditionModel, MultiStageUNet2DModel
    from tests.conftest import TINY_UNET

    if conditional:
        staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0, **overrides), stage_boundaries=(500,))
    else:
        torch.manual_seed(0)
        staged = MultiStageUNet2DModel.from_unet(UNet2DModel(**TINY_UNET, **overrides), stage_boundaries=(500,))
    staged.save_pretrained(tmp_path / "staged")
    export(str(tmp_path / "staged"), str(tmp_path / "stage1"), 1, "--verify", "--tolerance", "0")
    assert "max |source - converted| = 0.000e+00" in capsys.readouterr().out


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_an_export_warns_of_no_inconsistent_casting(staged_folder, tmp_path, half):
    """Every export printed diffusers' "There are modules in UNet2DModel that should be kept in float32: []. Casting
    directly with `to()` can lead to inconsistent results": the model was cast to the dtype it already had (and a
    UNet2DModel keeps no module in float32, so a float16 export casts nothing inconsistently either)."""
    source = staged_folder
    if half:
        MultiStagePipeline.from_pretrained(staged_folder).to(torch.float16).save_pretrained(tmp_path / "half")
        source = str(tmp_path / "half")
    import logging

    from diffusers.utils import logging as diffusers_logging

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    warnings, handler = [], Collect(logging.WARNING)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # as a user runs it (the test suite keeps diffusers' warnings quiet)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        unet = export(source, str(tmp_path / "stage1"), 1, "--verify")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        diffusers_logging.set_verbosity(verbosity)
    assert not [w for w in warnings if "should be kept in float32" in w]
    weights = load_file(os.path.join(tmp_path, "stage1", "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16 if half else torch.float32}
    assert unet.dtype == torch.float32  # reloaded and verified in float32


def test_a_class_context_pipeline_is_refused_by_name_and_its_unet_folder_exports(tiny_cond_unet, tmp_path, capsys):
    """A class-conditional cross-attention pipeline (`cin-mul*`: a `class_embedder` turns each class into the context
    its U-Net attends to) exported a UNet2DConditionModel without the class embedder, and said nothing: the folder
    could not be given a class label. It is refused by name; its `unet` folder, given on purpose, still exports."""
    from diffusers_stages import ClassContextEmbedding, MultiStageUNet2DConditionModel

    unet = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=(500,)).eval()
    embedder = ClassContextEmbedding(num_class_embeds=4, cross_attention_dim=32).eval()
    pipe = MultiStagePipeline(unet=unet, scheduler=DDIMScheduler(), class_embedder=embedder)
    pipe.save_pretrained(tmp_path / "cin")
    with pytest.raises(ValueError, match=r"`--source` .*cin has a `class_embedder`.*ClassContextEmbedding.*unet"):
        export(str(tmp_path / "cin"), str(tmp_path / "out"), 0)
    assert not (tmp_path / "out").exists()
    exported = export(str(tmp_path / "cin" / "unet"), str(tmp_path / "out"), 0, "--verify", "--tolerance", "0")
    assert "max |source - converted| = 0.000e+00" in capsys.readouterr().out
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    with torch.no_grad():  # the U-Net, given the class embedder's context, is stage 0
        context = pipe.class_embedder(labels)
        assert torch.equal(exported(x, 100, context).sample, unet(x, 100, context, stage_index=0).sample)
