import inspect
import json
import re

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from diffusers_stages import ExpertRoutingModel, MultiStageUNet2DModel, UViT2DModel
from tests.conftest import TINY_UNET
from tests.models.staged_model_tester import StagedModelTesterMixin


def _unet(kwargs, seed, **overrides):
    torch.manual_seed(seed)
    return UNet2DModel(**{**kwargs, **overrides}).eval()


def _tiny_dit(**overrides):
    torch.manual_seed(5)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        **{"in_channels": 3, "out_channels": 3, **overrides},
    )
    return dit.eval()  # eval: DiT drops class labels at random in training mode


@pytest.fixture
def three_experts(tiny_unet_kwargs):
    """Three experts of different architectures: a wide U-Net, a multi-stage U-Net, and a narrow U-Net."""
    torch.manual_seed(1)
    multistage = MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=(500,)).eval()
    wide = _unet(tiny_unet_kwargs, 0, block_out_channels=(16, 32))
    narrow = _unet(tiny_unet_kwargs, 2, block_out_channels=(4, 8), attention_head_dim=None)
    return ExpertRoutingModel([wide, multistage, narrow], stage_boundaries=(300, 600)).eval()


class TestExpertRoutingModel(StagedModelTesterMixin):
    """Three experts of different architectures: a wide U-Net, a multi-stage U-Net, and a narrow U-Net."""

    model_class = ExpertRoutingModel
    stage_modules = "experts"
    stage_timesteps = (10, 450, 900)
    mixed_timesteps = (10, 650, 400, 999, 0)  # experts 0, 2, 1, 2, 0
    mixed_stage_counts = (2, 1, 2)
    compile_stage = 0  # a plain UNet2DModel: the multi-stage expert routes by itself (a data-dependent branch)
    weight_files = tuple(f"expert_{i}/diffusion_pytorch_model.safetensors" for i in range(3))
    shared_parameter = None  # the experts share nothing
    attention_prefixes = ("experts.0.", "experts.1.")  # the narrow expert has no attention
    bad_configs = (
        ({"stage_boundaries": (600, 300)}, "`stage_boundaries` must be strictly increasing"),
        ({"boundary_units": "steps"}, "`boundary_units` must be one of"),
        ({"stage_boundaries": (500,)}, "gives 2 stages, got 3 experts"),
        ({"prediction_type": "noise"}, "prediction_type"),
    )
    device_maps = ("cpu",)  # "auto" reaches each expert's class: diffusers' UNet2DModel has no `_no_split_modules`

    def get_init_kwargs(self) -> dict:
        torch.manual_seed(1)
        multistage = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)).eval()
        wide = _unet(TINY_UNET, 0, block_out_channels=(16, 32))
        narrow = _unet(TINY_UNET, 2, block_out_channels=(4, 8), attention_head_dim=None)
        return {"experts": [wide, multistage, narrow], "stage_boundaries": (300, 600)}

    def test_device_map_auto_reaches_every_expert(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        with pytest.raises(ValueError, match=r"Expert 0 .* UNet2DModel does not support `device_map='auto'`"):
            ExpertRoutingModel.from_pretrained(tmp_path, device_map="auto")
        staged = ExpertRoutingModel([model.experts[1], model.experts[1]], stage_boundaries=(500,))
        staged.save_pretrained(tmp_path / "staged")
        loaded = ExpertRoutingModel.from_pretrained(tmp_path / "staged", device_map="auto")
        x, t = self.inputs(self.mixed_timesteps)
        with torch.no_grad():
            assert torch.equal(loaded(x, t).sample, staged(x, t).sample)

    def test_an_expert_without_gradient_checkpointing_is_named(self, tiny_unet_kwargs):
        unet = _unet(tiny_unet_kwargs, 0, num_class_embeds=11)  # the DiT's 10 classes and its unconditional label
        model = ExpertRoutingModel([unet, _tiny_dit()], stage_boundaries=(500,))
        model.experts[1]._supports_gradient_checkpointing = False  # as a class without it declares
        with pytest.raises(ValueError, match=r"Expert 1 \(DiTTransformer2DModel\) does not support gradient"):
            model.enable_gradient_checkpointing()
        model.disable_gradient_checkpointing()  # switching off skips it


def test_mixed_batch_sends_each_sample_to_its_own_expert_only(three_experts):
    x, t = torch.randn(5, 3, 8, 8), torch.tensor([10, 650, 400, 999, 0])
    calls = {i: [] for i in range(3)}
    for i, expert in enumerate(three_experts.experts):
        expert.register_forward_pre_hook(lambda m, args, i=i: calls[i].append(args[0].shape[0]))
    with torch.no_grad():
        out = three_experts(x, t).sample
        for idx, stage in (([0, 4], 0), ([2], 1), ([1, 3], 2)):
            alone = three_experts.experts[stage](x[idx], t[idx]).sample
            assert torch.allclose(out[idx], alone, atol=1e-6), f"stage {stage}"
    assert calls == {0: [2, 2], 1: [1, 1], 2: [2, 2]}  # one routed call + one reference call each
    assert three_experts.num_stages == 3 and three_experts.loaded_experts == [0, 1, 2]


def test_one_stage_batch_calls_the_expert_exactly_as_alone(three_experts):
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(three_experts(x, torch.tensor(450)).sample, three_experts.experts[1](x, 450).sample)
        assert torch.equal(three_experts(x, 999, stage_index=0).sample, three_experts.experts[0](x, 999).sample)
        assert three_experts(x, 10, return_dict=False)[0].shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    ("timestep", "kwargs", "message"),
    [
        (torch.tensor([10, 20, 30]), {}, r"`timestep` must be one value or one per sample \(2\).*got shape \(3,\)"),
        (torch.tensor([[10], [20]]), {}, r"`timestep` .*got shape \(2, 1\)"),
        (torch.tensor([10.0, float("nan")]), {}, r"`timestep` must be finite, got \[10.0, nan\]"),
        ("10", {}, r"`timestep` must be a number or a tensor, got str"),
        (10, {"stage_index": 3}, r"`stage_index` must be in \[0, 3\), got 3"),
        (10, {"stage_index": 0.0}, r"`stage_index` must be an integer, got 0.0"),
    ],
)
def test_forward_checks_the_timesteps_and_the_stage_index(three_experts, timestep, kwargs, message):
    with pytest.raises(ValueError, match=message):
        three_experts(torch.randn(2, 3, 8, 8), timestep, **kwargs)
    with pytest.raises(ValueError, match="`sample` must be a floating-point tensor"):
        three_experts([0.0], 10)


def test_the_stage_index_path_reads_no_tensor_value(three_experts, host_reads):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([999, 999])
    with torch.no_grad():
        assert host_reads(lambda: three_experts(x, t, stage_index=0)) == 0  # expert 0: a plain UNet2DModel
        assert host_reads(lambda: three_experts(x, t)) > 0  # routing reads the timesteps


def test_experts_of_other_diffusers_classes_with_per_sample_arguments(tiny_unet_kwargs):
    # a class-conditional U-Net and a DiT: class labels are split with the batch; DiT gets one timestep per sample (the
    # U-Net's 11 embeddings are the DiT's 10 classes and its unconditional label)
    unet = _unet(tiny_unet_kwargs, 0, num_class_embeds=11)
    model = ExpertRoutingModel([unet, _tiny_dit()], stage_boundaries=(500,))
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 900, 20]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = model(x, t, class_labels=y).sample
        assert torch.allclose(out[1:2], model.experts[1](x[1:2], t[1:2], class_labels=y[1:2]).sample, atol=1e-6)
        assert torch.allclose(out[[0, 2]], unet(x[[0, 2]], t[[0, 2]], class_labels=y[[0, 2]]).sample, atol=1e-6)
        assert model(x, torch.tensor(900), class_labels=y).sample.shape == (3, 3, 8, 8)

    # text-conditional experts: `encoder_hidden_states` rows follow their samples
    kwargs = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 6,
        "attention_head_dim": 4,
    }
    first, second = UNet2DConditionModel(**kwargs).eval(), UNet2DConditionModel(**kwargs).eval()
    text = torch.randn(3, 5, 6)
    with torch.no_grad():
        out = ExpertRoutingModel([first, second], stage_boundaries=(500,))(x, t, encoder_hidden_states=text).sample
        assert torch.allclose(out[1:2], second(x[1:2], t[1:2], text[1:2]).sample, atol=1e-6)


@pytest.mark.parametrize("num_class_embeds", [None, 10, 12])
def test_experts_that_disagree_on_their_classes_are_refused_also_against_a_dit(tiny_unet_kwargs, num_class_embeds):
    # a DiT counts its classes as `num_embeds_ada_norm` (its unconditional label is one more), a U-Net as
    # `num_class_embeds` (the last the unconditional label): only the latter key was compared, so an unconditional
    # U-Net with a DiT of 10 classes, or a U-Net of 9 classes with it, was accepted; the pipelines then failed inside
    # the unconditional expert (a TypeError) or checked labels against one expert's classes only
    unet = _unet(tiny_unet_kwargs, 0, num_class_embeds=num_class_embeds)
    dit = _tiny_dit()  # 10 classes
    with pytest.raises(ValueError, match=r"Experts disagree on their class embeddings \(the classes and the "):
        ExpertRoutingModel([unet, dit], stage_boundaries=(500,))
    # the same classes: the U-Net's 11 embeddings are the DiT's 10 classes and its unconditional label
    ExpertRoutingModel([_unet(tiny_unet_kwargs, 0, num_class_embeds=11), _tiny_dit()], stage_boundaries=(500,))


def test_an_argument_of_neither_one_row_nor_one_per_sample_is_named(tiny_cond_unet, tiny_unet_kwargs):
    # the routing splits only per-sample tensors: a mask of 2 rows for 3 samples went whole to each expert of a
    # mixed batch and ran, silently (a one-stage batch fails inside diffusers), and 2 class labels for 3 samples were
    # named against the sub-batch an expert got ("one per sample (1)")
    model = ExpertRoutingModel([tiny_cond_unet(0), tiny_cond_unet(1)], stage_boundaries=(500,))
    width = model.experts[0].config.cross_attention_dim
    x, t, text = torch.randn(3, 4, 8, 8), torch.tensor([10, 700, 900]), torch.randn(3, 5, width)
    with pytest.raises(
        ValueError, match=r"`encoder_attention_mask` must have one row or one per sample \(3\), got shape \(2, 5\)"
    ):
        model(x, t, encoder_hidden_states=text, encoder_attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"`added_cond_kwargs\['time_ids'\]` must have one row or one per sample"):
        model(x, t, encoder_hidden_states=text, added_cond_kwargs={"time_ids": torch.ones(2, 6)})
    # text given third, as diffusers' `unet(sample, timestep, encoder_hidden_states)`: named as the text it is, not
    # as this container's third argument (`class_labels`)
    with pytest.raises(
        ValueError, match=r"`encoder_hidden_states` must have one row or one per sample \(3\), got shape \(2, 5, "
    ):
        model(x, t, text[:2])
    labelled = ExpertRoutingModel(
        [_unet(tiny_unet_kwargs, 0, num_class_embeds=4), _unet(tiny_unet_kwargs, 1, num_class_embeds=4)],
        stage_boundaries=(500,),
    )
    x = torch.randn(3, 3, 8, 8)
    with pytest.raises(
        ValueError, match=r"`class_labels` must have one row or one per sample \(3\), got shape \(2,\)"
    ):
        labelled(x, t, class_labels=torch.tensor([1, 2]))
    with torch.no_grad():  # one row serves every sample, as it does for one expert
        assert torch.equal(
            labelled(x, t, class_labels=torch.tensor([2])).sample,
            labelled(x, t, class_labels=torch.tensor([2] * 3)).sample,
        )


def test_a_python_number_timestep_reaches_each_expert_as_it_would_alone(tiny_unet_kwargs):
    # a number is handed on as is, so each expert reads it by its own rule: UNet2DModel truncates a float (a learned
    # time embedding then looks it up); a one-per-sample float tensor instead failed there and gave other outputs
    learned = _unet(tiny_unet_kwargs, 1, time_embedding_type="learned", num_train_timesteps=1000)
    model = ExpertRoutingModel([_unet(tiny_unet_kwargs, 0), learned], stage_boundaries=(500,))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for t in (300.7, 900.0, 900):
            expert = model.experts[int(t >= 500)]
            assert torch.equal(model(x, t).sample, expert(x, t).sample), t


def test_out_channels_none_means_in_channels(tiny_unet_kwargs):
    # U-ViT and DiT leave `out_channels=None` in their configs for "as `in_channels`": they mix with U-Nets of 3
    unet = _unet(tiny_unet_kwargs, 0, num_class_embeds=11)  # class-conditional, as the DiT (10 classes + 1)
    uvit = UViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2, num_class_embeds=11).eval()
    dit = _tiny_dit(out_channels=None)
    assert uvit.config.out_channels is None and dit.config.out_channels is None
    model = ExpertRoutingModel([unet, uvit, dit], stage_boundaries=(300, 600))
    assert model.config.out_channels == 3
    with torch.no_grad():
        labels = torch.tensor([1, 2])
        assert model(torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), class_labels=labels).sample.shape == (
            2,
            3,
            8,
            8,
        )
    with pytest.raises(ValueError, match="out_channels"):
        ExpertRoutingModel([_unet(tiny_unet_kwargs, 1, out_channels=6), uvit], stage_boundaries=(500,))


@pytest.mark.parametrize("stage_index", [None, 0])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 8, 8)])
def test_a_sample_that_is_not_the_experts_shape_is_named(three_experts, stage_index, shape):
    # checked by the container (the experts declare `in_channels`), not a shape error inside an expert's convolution
    with pytest.raises(ValueError, match=r"`sample` must have shape \(batch, 3, height, width\)"):
        three_experts(torch.randn(shape), 100, stage_index=stage_index)  # expert 0: a plain UNet2DModel


def test_save_writes_one_plain_diffusers_folder_per_expert_and_reloads(three_experts, tmp_path):
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([10, 650, 400, 999])
    three_experts.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["stage_boundaries"] == [300.0, 600.0] and config["prediction_type"] == "epsilon"
    assert config["expert_classes"][1] == ["diffusers_stages.models.unet_multistage", "MultiStageUNet2DModel"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "expert_0", "expert_1", "expert_2", "expert_routing.py"]  # + AutoModel's file
    assert not list(tmp_path.rglob("*.bin")) and len(list(tmp_path.rglob("*.safetensors"))) == 3
    # every expert is a plain folder of its own class
    assert type(UNet2DModel.from_pretrained(tmp_path / "expert_2")) is UNet2DModel

    loaded = ExpertRoutingModel.from_pretrained(tmp_path, disable_mmap=True)
    assert [type(e) for e in loaded.experts] == [type(e) for e in three_experts.experts]
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, three_experts(x, t).sample)


def test_save_takes_model_mixins_positional_arguments(three_experts, tmp_path):
    # ModelMixin's order is (save_directory, is_main_process, save_function, safe_serialization, variant, ...): the
    # third was `safe_serialization`, so `save_pretrained(folder, True, None)` wrote pickled .bin files
    three_experts.save_pretrained(tmp_path, True, None, True, "fp16")
    weights = [p.name for p in tmp_path.rglob("*") if p.suffix in (".bin", ".safetensors")]
    assert len(weights) == 3 and all(name.endswith(".fp16.safetensors") for name in weights)
    three_experts.save_pretrained(tmp_path / "bin", True, torch.save, False)  # pickled only when asked
    assert len(list((tmp_path / "bin").rglob("*.bin"))) == 3 and not list((tmp_path / "bin").rglob("*.safetensors"))


def test_save_passes_use_flashpack_on_to_each_expert(three_experts, tmp_path):
    # ModelMixin's eighth argument: taken by keyword it was swallowed (safetensors written), by position a TypeError;
    # diffusers' pipeline save passes it only to save methods that name it. flashpack is not installed here.
    for call in (lambda: three_experts.save_pretrained(tmp_path / "a", use_flashpack=True),
                 lambda: three_experts.save_pretrained(tmp_path / "b", True, None, True, None, "10GB", False, True)):  # fmt: skip
        with pytest.raises(ImportError, match="flashpack"):
            call()
    assert "use_flashpack" in inspect.signature(three_experts.save_pretrained).parameters


def test_load_only_the_experts_a_run_needs(three_experts, tmp_path):
    three_experts.save_pretrained(tmp_path)
    partial = ExpertRoutingModel.from_pretrained(tmp_path, load_experts=[2])
    assert partial.loaded_experts == [2] and partial.experts[0] is None
    with torch.no_grad():
        assert partial(torch.randn(1, 3, 8, 8), 900).sample.shape == (1, 3, 8, 8)
        with pytest.raises(ValueError, match=r"Expert 0 .* not loaded.*load_experts=\[\.\.\., 0\]"):
            partial(torch.randn(2, 3, 8, 8), torch.tensor([900, 5]))
    with pytest.raises(ValueError, match="not loaded: load every expert"):
        partial.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="load_experts"):
        ExpertRoutingModel.from_pretrained(tmp_path, load_experts=[3])
    with pytest.raises(ValueError, match=r"`load_experts` must hold expert indices in \[0, 3\), got \[True\]"):
        ExpertRoutingModel.from_pretrained(tmp_path, load_experts=[True])  # not the folder `expert_True`
    with pytest.raises(ValueError, match="`load_experts` must be a list of expert indices, got 2"):
        ExpertRoutingModel.from_pretrained(tmp_path, load_experts=2)  # not a TypeError


def test_a_container_with_no_expert_loaded_says_so_for_its_device_and_dtype(three_experts, tmp_path):
    # `load_experts=[]` (the training CLI reads a base's routing that way): `device` was a bare StopIteration and
    # `dtype` an UnboundLocalError inside diffusers (a module with no tensors at all)
    three_experts.save_pretrained(tmp_path)
    empty = ExpertRoutingModel.from_pretrained(tmp_path, load_experts=[], torch_dtype=torch.float16)
    assert empty.loaded_experts == [] and empty.partition == three_experts.partition
    for name in ("device", "dtype"):
        with pytest.raises(ValueError, match=rf"`{name}`.* no expert is loaded.*load_experts"):
            getattr(empty, name)
    with pytest.raises(ValueError, match=r"Expert 0 .* not loaded"):
        empty(torch.randn(1, 3, 8, 8, dtype=torch.float16), 5)
    empty.experts[1] = three_experts.experts[1].half()  # an expert set later gives both
    assert empty.dtype == torch.float16 and empty.device == torch.device("cpu")


def test_routing_settings_passed_to_from_pretrained_replace_the_saved_ones(three_experts, tmp_path):
    # as diffusers' models (and MultiStageUNet2DModel) take a config key passed to `from_pretrained`: they were passed
    # on to every expert instead, so the container kept its saved boundaries silently (and the multi-stage expert
    # took them as its own)
    three_experts.save_pretrained(tmp_path)
    loaded = ExpertRoutingModel.from_pretrained(tmp_path, stage_boundaries=(200, 700), num_train_timesteps=800)
    assert loaded.partition.boundaries == (200.0, 700.0) and loaded.partition.num_train_timesteps == 800
    assert loaded.config.stage_boundaries == [200.0, 700.0] and loaded.config.num_train_timesteps == 800
    assert loaded.experts[1].partition == three_experts.experts[1].partition  # the expert's own routing is kept
    assert loaded.experts[0].config.num_train_timesteps == three_experts.experts[0].config.num_train_timesteps
    with pytest.raises(ValueError, match="gives 2 stages, got 3 experts"):
        ExpertRoutingModel.from_pretrained(tmp_path, stage_boundaries=(500,))  # checked as the constructor's
    assert ExpertRoutingModel.from_pretrained(tmp_path, prediction_type="v_prediction").config.prediction_type == (
        "v_prediction"
    )
    with pytest.raises(ValueError, match="prediction_type"):
        ExpertRoutingModel.from_pretrained(tmp_path, prediction_type="noise")
    for key in ("expert_classes", "expert_configs"):  # what the folder's experts are: not a setting
        with pytest.raises(ValueError, match=f"`{key}` cannot be passed to `ExpertRoutingModel.from_pretrained`"):
            ExpertRoutingModel.from_pretrained(tmp_path, **{key: None})


def test_a_local_path_that_is_not_a_saved_folder_is_named_not_taken_for_a_hub_id(three_experts, tmp_path):
    # was huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" (as diffusers' own
    # models do, a local path is not sent to the Hub)
    three_experts.save_pretrained(tmp_path / "experts")
    for path, subfolder in ((tmp_path, "expert"), (tmp_path / "experts" / "config.json", None)):
        with pytest.raises(OSError, match=f"{re.escape(str(path))}.* is not a folder"):
            ExpertRoutingModel.from_pretrained(path, subfolder=subfolder)
    assert ExpertRoutingModel.from_pretrained(tmp_path, subfolder="experts").num_stages == 3


def test_checkpoint_that_disagrees_with_its_config_is_refused(three_experts, tmp_path):
    three_experts.save_pretrained(tmp_path)
    config_path = tmp_path / "expert_0" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [8, 16]  # the weights are (16, 32)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expert_0"):
        ExpertRoutingModel.from_pretrained(tmp_path)


def test_foreign_expert_modules_are_not_imported_from_a_config(three_experts, tmp_path):
    three_experts.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["expert_classes"][0] = ["some_unknown_package.models", "Net"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="import some_unknown_package.models"):
        ExpertRoutingModel.from_pretrained(tmp_path)


def test_bad_configurations_give_clear_errors(tiny_unet_kwargs):
    a, b = _unet(tiny_unet_kwargs, 0), _unet(tiny_unet_kwargs, 1)
    with pytest.raises(ValueError, match="gives 3 stages, got 2 experts"):
        ExpertRoutingModel([a, b], stage_boundaries=(300, 600))
    with pytest.raises(ValueError, match="strictly increasing"):
        ExpertRoutingModel([a, b, a], stage_boundaries=(600, 300))
    with pytest.raises(ValueError, match="inside the schedule"):
        ExpertRoutingModel([a, b], stage_boundaries=(1000,))
    with pytest.raises(ValueError, match="same target.*expert 0: 'epsilon', expert 1: 'v_prediction'"):
        ExpertRoutingModel([a, b], stage_boundaries=(500,), prediction_type=["epsilon", "v_prediction"])
    with pytest.raises(ValueError, match="prediction_type"):
        ExpertRoutingModel([a, b], stage_boundaries=(500,), prediction_type="noise")
    for kind in (None, 3):  # not a TypeError on iterating it
        with pytest.raises(ValueError, match=f"`prediction_type` must be one of .* or one per expert, got {kind}"):
            ExpertRoutingModel([a, b], stage_boundaries=(500,), prediction_type=kind)
    with pytest.raises(ValueError, match="in_channels"):
        ExpertRoutingModel([a, _unet(tiny_unet_kwargs, 2, in_channels=4)], stage_boundaries=(500,))
    with pytest.raises(ValueError, match="ModelMixin"):
        ExpertRoutingModel([a, torch.nn.Conv2d(3, 3, 1)], stage_boundaries=(500,))
    with pytest.raises(ValueError, match="expert_classes"):
        ExpertRoutingModel([a, None], stage_boundaries=(500,))
    same = ExpertRoutingModel([a, b], stage_boundaries=(500,), prediction_type=["v_prediction"] * 2)
    assert same.config.prediction_type == "v_prediction"


def test_a_config_never_imports_a_trusted_module_that_runs_on_import(three_experts, tmp_path, monkeypatch):
    import sys

    import diffusers_stages.demo

    marker = tmp_path / "ran"
    monkeypatch.setattr(diffusers_stages.demo, "main", lambda: marker.write_text("ran"))  # what `__main__` runs
    monkeypatch.delitem(sys.modules, "diffusers_stages.demo.__main__", raising=False)
    three_experts.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["expert_classes"][0] = ["diffusers_stages.demo.__main__", "MultiStageUNet2DModel"]
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="diffusers_stages.demo.__main__"):
        ExpertRoutingModel.from_pretrained(tmp_path / "saved")
    assert not marker.exists() and "diffusers_stages.demo.__main__" not in sys.modules


@pytest.mark.parametrize(
    "edit",
    [
        {"expert_classes": {"0": ["diffusers", "UNet2DModel"]}},
        {"expert_classes": 3},
        {"stage_boundaries": None},
        {"boundary_units": None, "prediction_type": None},
    ],
    ids=["expert-classes-dict", "expert-classes-number", "no-boundaries", "no-units"],
)
def test_a_container_config_of_the_wrong_shape_is_named(three_experts, tmp_path, edit):
    three_experts.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json"):
        ExpertRoutingModel.from_pretrained(tmp_path)


def test_a_multi_stage_expert_is_compiled_by_its_own_regions():
    """`compile_stages` compiles a multi-stage expert block by block and decoder by decoder, as it compiles that model
    alone: compiled whole, its routing (a host read of the stage counts) broke the graph and recompiled per stage."""
    multistage = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)).eval()
    model = ExpertRoutingModel([_unet(TINY_UNET, 0), multistage], stage_boundaries=(500,))
    regions = model.compile_regions()
    assert multistage not in regions and model.experts[0] in regions
    assert [r for r in regions if r is not model.experts[0]] == multistage.compile_regions()


def test_compiling_a_model_with_a_fused_expert_names_that_expert():
    # the refusal said "call `disable_fused_decoders()` first", which on the routing model changed nothing
    multistage = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)).eval()
    model = ExpertRoutingModel([_unet(TINY_UNET, 0), multistage], stage_boundaries=(500,))
    multistage.enable_fused_decoders()
    with pytest.raises(ValueError, match=r"call `model\.experts\[1\]\.disable_fused_decoders\(\)`"):
        model.compile_stages(backend="eager")
    model.experts[1].disable_fused_decoders()
    model.compile_stages(backend="eager")  # as the message says


def test_from_config_builds_a_fresh_model_of_the_same_architecture(three_experts, tmp_path):
    # was `TypeError: missing 'experts'`: diffusers' EMAModel and training scripts call `from_config(model.config)`
    fresh = ExpertRoutingModel.from_config(three_experts.config)
    assert [type(e) for e in fresh.experts] == [type(e) for e in three_experts.experts]
    assert fresh.config.stage_boundaries == three_experts.config.stage_boundaries
    shapes = {k: v.shape for k, v in three_experts.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    fresh.load_state_dict(three_experts.state_dict())
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 650, 400])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, t).sample, three_experts(x, t).sample)
    # a saved folder's config too, and an experts' set given explicitly
    three_experts.save_pretrained(tmp_path)
    again = ExpertRoutingModel.from_config(ExpertRoutingModel.load_config(tmp_path))
    assert [e.config for e in again.experts] == [e.config for e in fresh.experts]
    experts = [ExpertRoutingModel.from_config(three_experts.config).experts[i] for i in range(3)]
    assert ExpertRoutingModel.from_config(three_experts.config, experts=experts).experts[1] is experts[1]


def test_diffusers_ema_model_saves_and_reloads_the_container(three_experts, tmp_path):
    from diffusers.training_utils import EMAModel

    ema = EMAModel(three_experts.parameters(), model_cls=ExpertRoutingModel, model_config=three_experts.config)
    ema.save_pretrained(tmp_path / "ema")
    loaded = EMAModel.from_pretrained(tmp_path / "ema", model_cls=ExpertRoutingModel)
    assert all(torch.equal(a, b) for a, b in zip(loaded.shadow_params, ema.shadow_params))


def test_diffusers_ema_model_of_a_partly_loaded_container_is_refused_not_misaligned(tiny_unet_kwargs, tmp_path):
    # `from_config` of a container loaded with `load_experts` built every expert, so `EMAModel.save_pretrained` copied
    # the loaded expert's averages into expert 0 (`zip` of the parameters) and saved expert 1 with fresh weights
    from diffusers.training_utils import EMAModel

    experts = [_unet(tiny_unet_kwargs, 0), _unet(tiny_unet_kwargs, 1)]
    ExpertRoutingModel(experts, stage_boundaries=(500,)).save_pretrained(tmp_path / "full")
    partial = ExpertRoutingModel.from_pretrained(tmp_path / "full", load_experts=[1])
    with pytest.raises(ValueError, match=r"no `expert_configs` entry for experts \[0\]"):
        ExpertRoutingModel.from_config(partial.config)
    ema = EMAModel(partial.parameters(), model_cls=ExpertRoutingModel, model_config=partial.config)
    with pytest.raises(ValueError, match=r"experts \[0\]"):
        ema.save_pretrained(tmp_path / "ema")
    assert not (tmp_path / "ema").exists()
    # every expert loaded: the same folder's config builds the whole container
    fresh = ExpertRoutingModel.from_config(ExpertRoutingModel.load_config(tmp_path / "full"))
    assert fresh.loaded_experts == [0, 1]


def test_a_container_completed_after_a_partial_load_saves_every_experts_config(tiny_unet_kwargs, tmp_path):
    # `model.experts[i] = ...` (what the unloaded-expert error suggests) completes the container: its saved
    # `config.json` must describe every expert, not keep the `None` of the partial load
    experts = [_unet(tiny_unet_kwargs, 0), _unet(tiny_unet_kwargs, 1)]
    ExpertRoutingModel(experts, stage_boundaries=(500,)).save_pretrained(tmp_path / "full")
    partial = ExpertRoutingModel.from_pretrained(tmp_path / "full", load_experts=[1])
    partial.experts[0] = UNet2DModel.from_pretrained(tmp_path / "full" / "expert_0")
    partial.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["expert_configs"] == json.loads((tmp_path / "full" / "config.json").read_text())["expert_configs"]
    fresh = ExpertRoutingModel.from_config(ExpertRoutingModel.load_config(tmp_path / "again"))
    assert fresh.loaded_experts == [0, 1]


def test_from_config_builds_only_the_classes_diffusers_and_the_package_export(three_experts, tmp_path):
    config = dict(three_experts.config)
    config["expert_classes"] = [["tests.models.test_expert_routing", "Net"], *config["expert_classes"][1:]]
    with pytest.raises(ValueError, match=r"Expert 0 .*tests.models.test_expert_routing.*experts=\["):
        ExpertRoutingModel.from_config(config)
    # a config saved without the experts' configs says what to call instead
    config = {k: v for k, v in three_experts.config.items() if k != "expert_configs"}
    with pytest.raises(ValueError, match=r"`expert_configs`.*from_pretrained.*experts=\["):
        ExpertRoutingModel.from_config(config)


class _UNetKeepingItsOutput(UNet2DModel):
    """A diffusers-style class that declares what layerwise casting must skip (anchored to its own module names)."""

    _skip_layerwise_casting_patterns = ["^conv_out$", "norm"]  # noqa: RUF012 (as diffusers declares it)
    _keep_in_fp32_modules = ["time_embedding"]  # noqa: RUF012


def _cast_layers(model) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if getattr(module, "_diffusers_hook", None) is not None
        and module._diffusers_hook.get_hook("layerwise_casting") is not None
    }


def test_layerwise_casting_casts_each_expert_as_alone(tiny_unet_kwargs):
    # the container applied diffusers' patterns to its own names: an expert's anchored patterns (`^conv_out$`) and
    # `_keep_in_fp32_modules` were lost, and its float32 layers were cast
    def experts():
        torch.manual_seed(0)
        uvit = UViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
        return [_UNetKeepingItsOutput(**tiny_unet_kwargs).eval(), uvit.eval()]

    alone = experts()
    for expert in alone:
        expert.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    model = ExpertRoutingModel(experts(), stage_boundaries=(500,))
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    expected = {f"experts.{i}.{name}" for i, expert in enumerate(alone) for name in _cast_layers(expert)}
    assert _cast_layers(model) == expected and "experts.0.conv_out" not in expected
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8), torch.tensor([10, 900])).sample
    assert torch.isfinite(out).all()
    # patterns given by the caller name the container's modules, as on any diffusers model
    model = ExpertRoutingModel(experts(), stage_boundaries=(500,))
    model.enable_layerwise_casting(torch.float8_e4m3fn, torch.float32, skip_modules_pattern=(r"^experts\.1\.",))
    assert _cast_layers(model) and not any(name.startswith("experts.1.") for name in _cast_layers(model))
    assert "experts.0.conv_out" not in _cast_layers(model)  # the expert's own patterns still hold


FREEU = {"s1": 0.9, "s2": 0.2, "b1": 1.2, "b2": 1.4}


def _freeu_factors(expert) -> list:
    decoders = getattr(expert, "decoders", None) or [expert]
    return [(b.s1, b.s2, b.b1, b.b2) for d in decoders for b in d.up_blocks if getattr(b, "s1", None) is not None]


def test_enable_freeu_reaches_every_expert(tiny_cond_unet):
    # `pipe.enable_freeu(...)` calls `pipe.unet.enable_freeu`: the container had none (AttributeError)
    from diffusers_stages import MultiStageUNet2DConditionModel

    def experts():
        staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(1), stage_boundaries=(500,))
        return [tiny_cond_unet(0), staged.eval()]

    model, alone = ExpertRoutingModel(experts(), stage_boundaries=(500,)), experts()
    model.enable_freeu(**FREEU)
    for expert in alone:
        expert.enable_freeu(**FREEU)
    assert all(_freeu_factors(e) and set(_freeu_factors(e)) == {tuple(FREEU.values())} for e in model.experts)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        for stage, t in ((0, 10), (1, 900)):
            expected = alone[stage](x, t, encoder_hidden_states=text).sample
            assert torch.equal(model(x, t, encoder_hidden_states=text).sample, expected)
        model.disable_freeu()
        assert not any(_freeu_factors(e) for e in model.experts)


def test_enable_freeu_names_an_expert_without_it(tiny_unet_kwargs):
    # diffusers' UNet2DModel (as MultiStageUNet2DModel, built on it) has no FreeU
    model = ExpertRoutingModel(
        [MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=(500,)), _unet(tiny_unet_kwargs, 0)],
        stage_boundaries=(500,),
    )
    with pytest.raises(ValueError, match=r"Expert 0 \(MultiStageUNet2DModel\) does not support FreeU"):
        model.enable_freeu(**FREEU)
    model.disable_freeu()  # nothing to switch off: no error


def test_an_expert_whose_config_does_not_serialise_still_builds_a_container(tiny_unet_kwargs):
    # keeping each expert's config must not stop a container of experts that run but could not be saved
    odd = _unet(tiny_unet_kwargs, 0)
    odd.register_to_config(note=object())
    model = ExpertRoutingModel([odd, _unet(tiny_unet_kwargs, 1)], stage_boundaries=(500,))
    assert model.config.expert_configs[0] is None and model.config.expert_configs[1] is not None
    with pytest.raises(ValueError, match=r"no `expert_configs` entry for experts \[0\]"):
        ExpertRoutingModel.from_config(model.config)


def test_from_config_builds_the_package_classes_exported_by_its_models_module():
    # `EarlyExitUViT2DModel` is exported by `diffusers_stages.models` only: it was refused as an unknown class
    from diffusers_stages.models import EarlyExitUViT2DModel

    torch.manual_seed(0)
    expert = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2).eval()
    fresh = ExpertRoutingModel.from_config(ExpertRoutingModel([expert], stage_boundaries=()).config)
    public = [{k: v for k, v in e.config.items() if not k.startswith("_")} for e in (fresh.experts[0], expert)]
    assert type(fresh.experts[0]) is EarlyExitUViT2DModel and public[0] == public[1]


def test_output_loading_info_has_diffusers_shape_with_the_containers_key_names(tiny_unet_kwargs, tmp_path):
    # it was a dict of per-expert infos ({0: {...}, 1: {...}}): `info["missing_keys"]`, as for any diffusers model,
    # was a KeyError
    experts = ExpertRoutingModel([_unet(tiny_unet_kwargs, 0), _unet(tiny_unet_kwargs, 1)], stage_boundaries=(500,))
    experts.save_pretrained(tmp_path)
    _, reference = UNet2DModel.from_pretrained(tmp_path / "expert_0", output_loading_info=True)
    model, info = ExpertRoutingModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info) == set(reference) and all(value == [] for value in info.values())
    _, info = ExpertRoutingModel.from_pretrained(tmp_path, output_loading_info=True, load_experts=[1])
    assert set(info) == set(reference)


def test_compile_repeated_blocks_compiles_each_experts_repeated_blocks(tiny_cond_unet):
    """diffusers' `compile_repeated_blocks` (`pipe.unet.compile_repeated_blocks()` of a Stable Diffusion pipeline whose
    unet routes to experts) was a `ValueError` telling the user to set `_repeated_blocks` on the package's class,
    though its experts declare theirs (`UNet2DConditionModel`: `BasicTransformerBlock`): the container now declares
    the union of its experts', and experts that declare none are refused by diffusers, as each of them alone."""
    model = ExpertRoutingModel([tiny_cond_unet(0), tiny_cond_unet(1)], stage_boundaries=(500,)).eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = model(x, t, encoder_hidden_states=text).sample
    assert model._repeated_blocks == ["BasicTransformerBlock"]
    model.compile_repeated_blocks(backend="eager")
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, encoder_hidden_states=text).sample, expected)
    plain = ExpertRoutingModel([_unet(TINY_UNET, 0), _unet(TINY_UNET, 1)], stage_boundaries=(500,))
    with pytest.raises(ValueError, match="`_repeated_blocks` attribute is empty"):  # as `UNet2DModel` alone
        plain.compile_repeated_blocks(backend="eager")


def test_a_missing_expert_is_named_with_its_interval_in_its_units(three_experts):
    # a sigma expert's interval (b_{s-1}, b_s] was written [b_{s-1}, b_s), the timestep convention
    experts = list(three_experts.experts)
    sigma = ExpertRoutingModel(experts, stage_boundaries=(2.5, 10.0), boundary_units="sigma")
    sigma.experts[1] = None
    with pytest.raises(ValueError, match=r"Expert 1 \(noise levels \(2.5, 10\] in 'sigma' units\) is not loaded"):
        sigma.expert(1)
    three_experts.experts[2] = None
    with pytest.raises(ValueError, match=r"Expert 2 \(noise levels \[600, 1000\) in 'timestep' units\)"):
        three_experts.expert(2)


@pytest.mark.parametrize("timestep", [900, np.int64(900)])
def test_an_integer_timestep_reaches_dit_experts_as_one_per_sample(tiny_unet_kwargs, timestep):
    # `forward` documents an int timestep; a DiT expert takes tensors only, and an int reached it as is
    # (AttributeError: 'int' object has no attribute 'shape', inside diffusers). A float still reaches each expert as
    # given (test_a_python_number_timestep_reaches_each_expert_as_it_would_alone)
    unet = _unet(tiny_unet_kwargs, 0, num_class_embeds=11)
    model = ExpertRoutingModel([unet, _tiny_dit()], stage_boundaries=(500,))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, timestep, class_labels=y).sample
        expected = model.experts[1](x, torch.tensor([timestep] * 2), class_labels=y).sample
        assert torch.allclose(out, expected, atol=1e-6)
        # a U-Net expert's output with an int is unchanged (diffusers makes the same long tensor)
        assert torch.equal(model(x, 10, class_labels=y).sample, unet(x, 10, class_labels=y).sample)


def _legacy_dit(**overrides):
    """A DiT built as diffusers' legacy `Transformer2DModel` (its forward takes `encoder_hidden_states` second)."""
    from diffusers import Transformer2DModel

    torch.manual_seed(5)
    kwargs = dict(num_attention_heads=2, attention_head_dim=4, num_layers=1, sample_size=8, patch_size=2)
    kwargs.update(num_embeds_ada_norm=10, norm_type="ada_norm_zero", in_channels=3, out_channels=3, **overrides)
    return Transformer2DModel(**kwargs).eval()


def test_a_legacy_transformer2d_dit_expert_gets_its_timestep_by_name(tiny_unet_kwargs):
    # diffusers' `Transformer2DModel` takes `encoder_hidden_states` second: the container gave it the timestep there,
    # and the DiT failed inside its time embedding ("'NoneType' object has no attribute 'shape'"); DiTPipeline names it
    legacy = _legacy_dit()
    model = ExpertRoutingModel([_unet(tiny_unet_kwargs, 0, num_class_embeds=11), legacy], stage_boundaries=(500,))
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 900, 20]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = model(x, t, class_labels=y).sample
        assert torch.equal(out[1:2], legacy(x[1:2], timestep=t[1:2], class_labels=y[1:2]).sample)
        assert torch.equal(
            model(x, 900, class_labels=y).sample, legacy(x, timestep=t.new_full((3,), 900), class_labels=y).sample
        )


def test_call_denoiser_passes_the_timestep_by_name_to_a_compiled_legacy_dit_too():
    # the choice is made once per class, from the class's own `forward`: a `torch.compile`d model's wrapper takes
    # (*args, **kwargs), so its original module's forward decides (positionally, the DiT failed as in the test above)
    from diffusers_stages.models.expert_routing import call_denoiser

    legacy = _legacy_dit()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = legacy(x, timestep=t, class_labels=y).sample
        assert torch.equal(call_denoiser(legacy, x, t, class_labels=y).sample, expected)
        compiled = torch.compile(legacy, backend="eager")
        torch.testing.assert_close(call_denoiser(compiled, x, t, class_labels=y).sample, expected)


def test_a_saved_legacy_transformer2d_dit_expert_reloads_as_diffusers_remaps_it(tiny_unet_kwargs, tmp_path):
    # diffusers' `Transformer2DModel.from_pretrained` loads a DiT folder as a `DiTTransformer2DModel` (its legacy
    # remapping, as for facebook/DiT-XL-2-256): the reload was refused, "`expert_classes`=[..., Transformer2DModel]
    # does not match the experts given: [..., DiTTransformer2DModel]"
    unet = _unet(tiny_unet_kwargs, 0, num_class_embeds=11)
    model = ExpertRoutingModel([unet, _legacy_dit()], stage_boundaries=(500,))
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 900, 20]), torch.tensor([1, 2, 3])
    model.save_pretrained(tmp_path)
    reloaded = ExpertRoutingModel.from_pretrained(tmp_path)
    assert isinstance(reloaded.experts[1], DiTTransformer2DModel)
    assert reloaded.config.expert_classes[1] == ["diffusers", "DiTTransformer2DModel"]
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, class_labels=y).sample, model(x, t, class_labels=y).sample)
    partial = ExpertRoutingModel.from_pretrained(tmp_path, load_experts=[1], torch_dtype=torch.float64)
    with torch.no_grad():
        expected = model.experts[1].double()(x.double(), timestep=t.new_full((3,), 900), class_labels=y).sample
        assert torch.equal(partial(x.double(), 900, class_labels=y).sample, expected)


@pytest.mark.parametrize("steps", [500, 2000])
def test_an_expert_trained_on_another_number_of_timesteps_is_named(tiny_unet_kwargs, steps):
    # a learned time embedding of 500 rows in a container of 1000 timesteps was accepted, and every sample routed to
    # it above 499 failed inside the embedding ("IndexError: index out of range in self"); one of 2000 ran silently
    # on timesteps of another schedule
    other = _unet(tiny_unet_kwargs, 1, time_embedding_type="learned", num_train_timesteps=steps)
    with pytest.raises(ValueError, match=rf"Expert 1 \(UNet2DModel\) was built for num_train_timesteps={steps}, "):
        ExpertRoutingModel([_unet(tiny_unet_kwargs, 0), other], stage_boundaries=(400,))
    model = ExpertRoutingModel([_unet(tiny_unet_kwargs, 0), other], stage_boundaries=(400,), num_train_timesteps=steps)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([450])).sample, other(x, torch.tensor([450])).sample)


def test_experts_of_other_prediction_types_are_named_with_their_types(tiny_unet_kwargs):
    # the error listed the types only ("got prediction types ['epsilon', 'v_prediction']"), not which expert (or
    # which argument) gave the odd one
    experts = [_unet(tiny_unet_kwargs, 0), _unet(tiny_unet_kwargs, 1), _unet(tiny_unet_kwargs, 2)]
    with pytest.raises(ValueError, match=r"got expert 0: 'epsilon', expert 1: 'epsilon', expert 2: 'v_prediction'"):
        ExpertRoutingModel(
            experts, stage_boundaries=(300, 600), prediction_type=["epsilon", "epsilon", "v_prediction"]
        )
    experts[1].register_to_config(prediction_type="sample")  # a config that declares its expert's target
    with pytest.raises(ValueError, match=r"got `prediction_type`='epsilon', expert 1's config: 'sample'"):
        ExpertRoutingModel(experts, stage_boundaries=(300, 600))
