import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_stages.models import EarlyExitUViT2DModel
from diffusers_stages.models.early_exit import early_exit_loss
from diffusers_stages.pipelines import record_exit_profile
from tests.models.staged_model_tester import assert_group_offload_keeps_outputs, assert_layerwise_casting_works

TINY = {"sample_size": 8, "hidden_size": 16, "num_layers": 3, "num_attention_heads": 2}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EarlyExitUViT2DModel(**TINY).eval()


def _set_uncertainties(model, values):
    """Make exit ``i``'s uncertainty the constant ``values[i]`` (zero weights, logit bias)."""
    for head, value in zip(model.uncertainty_heads, values):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, math.log(value / (1 - value)))


def test_exits_at_the_first_block_under_the_threshold_and_returns_that_exit(model):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(400)
    _set_uncertainties(model, [0.9, 0.6, 0.2])
    with torch.no_grad():
        predictions, uncertainties = model(x, t, return_all_exits=True)
        assert [round(float(u.mean()), 4) for u in uncertainties] == [0.9, 0.6, 0.2]
        for threshold, layer in ((0.95, 1), (0.7, 2), (0.5, 3), (0.1, 3), (None, 3)):
            out = model(x, t, exit_threshold=threshold).sample
            assert model.last_exit_layer == layer, threshold
            assert torch.allclose(out, predictions[layer - 1], atol=1e-6)


def test_training_lowers_both_the_denoising_and_the_uncertainty_loss(model):
    model.train()
    torch.manual_seed(1)
    noisy, target, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([10, 300, 600, 900])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = early_exit_loss(model, noisy, t, target).item()
    for _ in range(30):
        loss = early_exit_loss(model, noisy, t, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first
    # the uncertainty heads received gradients: they are trained, not decorative
    assert all(head.weight.grad is not None and head.weight.grad.abs().sum() > 0 for head in model.uncertainty_heads)


def test_exit_profile_over_a_sampling_run(model):
    _set_uncertainties(model, [0.9, 0.6, 0.2])
    early = record_exit_profile(model, DDIMScheduler(), num_inference_steps=3, exit_threshold=0.7)
    full = record_exit_profile(model, DDIMScheduler(), num_inference_steps=3)
    assert [t for t, _ in early] == [666.0, 333.0, 0.0]
    assert [layer for _, layer in early] == [2, 2, 2] and [layer for _, layer in full] == [3, 3, 3]
    assert model.exit_threshold is None  # restored after the run
    batch = record_exit_profile(model, DDIMScheduler(), num_inference_steps=3, exit_threshold=0.7, batch_size=4)
    assert batch == early  # one entry per call, whatever the batch


@pytest.mark.parametrize(
    "scheduler",
    [FlowMatchEulerDiscreteScheduler(), EDMEulerScheduler(), DDIMScheduler(num_train_timesteps=500)],
    ids=["flow_matching", "edm", "500_train_steps"],
)
def test_exit_profile_takes_any_scheduler_the_pipelines_take(model, scheduler):
    """The profile's one-model pipeline follows the scheduler (its prediction type, its timestep units, its training
    steps): a flow-matching scheduler has no `prediction_type` config, an EDM one conditions on ln(sigma)/4, and a
    single model has no stage boundaries these could disagree with."""
    _set_uncertainties(model, [0.9, 0.6, 0.2])
    profile = record_exit_profile(model, scheduler, num_inference_steps=2, exit_threshold=0.7)
    assert [layer for _, layer in profile] == [2, 2]


def test_save_reload_and_bad_configs(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = EarlyExitUViT2DModel.from_pretrained(tmp_path, disable_mmap=True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 10).sample, model(x, 10).sample)
    with pytest.raises(ValueError, match="num_layers"):
        EarlyExitUViT2DModel(**{**TINY, "num_layers": 4})
    with pytest.raises(ValueError, match="patch_size"):
        EarlyExitUViT2DModel(**{**TINY, "sample_size": 9})
    with pytest.raises(ValueError, match="class_labels"):
        EarlyExitUViT2DModel(**TINY, num_class_embeds=3)(x, 10)
    with pytest.raises(ValueError, match="`exit_threshold` must be a finite number or None, got nan"):
        EarlyExitUViT2DModel(**TINY, exit_threshold=float("nan"))  # a nan would never let a sample exit


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.randn(1, 3, 16, 16), 10), {}, r"`sample` must be 8x8 \(the model's `sample_size`\)"),
        ((torch.randn(1, 4, 8, 8), 10), {}, r"`sample` must have shape \(batch, 3, height, width\)"),
        ((torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3])), {}, r"`timestep` must be one value or one per sample"),
        ((torch.randn(1, 3, 8, 8), float("nan")), {}, r"`timestep` must be finite, got nan"),
        ((torch.randn(1, 3, 8, 8), 10), {"class_labels": torch.tensor([0])}, r"`class_labels` were given"),
        ((torch.randn(1, 3, 8, 8), 10), {"exit_threshold": float("nan")}, r"`exit_threshold` must be a finite number"),
        ((torch.randn(1, 3, 8, 8), 10), {"exit_threshold": "0.5"}, r"`exit_threshold` must be a finite number"),
    ],
)
def test_forward_checks_its_inputs_like_a_library(model, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(*args, **kwargs)


def test_class_labels_are_checked_and_one_label_serves_the_batch():
    torch.manual_seed(0)
    model = EarlyExitUViT2DModel(**TINY, num_class_embeds=3).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`class_labels` must be class indices in \[0, 3\), got \[0, 3\]"):
        model(x, 10, class_labels=torch.tensor([0, 3]))
    with torch.no_grad():
        assert torch.equal(
            model(x, 10, class_labels=torch.tensor([2])).sample, model(x, 10, class_labels=torch.tensor([2, 2])).sample
        )


def test_each_sample_exits_at_its_own_depth_and_gets_its_single_sample_result(model):
    torch.manual_seed(3)
    for head in model.uncertainty_heads:  # spread the uncertainties so that the two samples disagree
        head.weight.data.mul_(200.0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([300, 300])
    with torch.no_grad():
        predictions, uncertainties = model(x, t, return_all_exits=True)
        first = uncertainties[0].mean(dim=1)
        assert abs(float(first[0] - first[1])) > 1e-3
        threshold = float(first.mean())  # one sample is under it after the first block, the other not
        out = model(x, t, exit_threshold=threshold).sample
        layers = model.last_exit_layers.tolist()
        low = int(first.argmin())
        assert layers[low] == 1 and layers[1 - low] > 1 and model.last_exit_layer == max(layers)
        for i in range(2):
            assert torch.allclose(out[i], predictions[layers[i] - 1][i], atol=1e-6)
            alone = model(x[i : i + 1], t[i : i + 1], exit_threshold=threshold).sample
            assert model.last_exit_layers.tolist() == [layers[i]]
            assert torch.allclose(out[i : i + 1], alone, atol=1e-6)


def test_per_sample_loss_averages_to_the_batch_loss(model):
    noisy, target, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([10, 400, 900])
    per_sample = early_exit_loss(model, noisy, t, target, reduction="none")
    assert per_sample.shape == (3,)
    assert torch.allclose(per_sample.mean(), early_exit_loss(model, noisy, t, target), atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        early_exit_loss(model, noisy, t, target, reduction="sum")


def test_layerwise_casting_runs_and_stays_close(model):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    assert_layerwise_casting_works(model, lambda m, dtype: m(x.to(dtype), t).sample)


def test_a_threshold_set_on_the_model_is_saved_with_it(model, tmp_path):
    # what the training task's description says to do: set the trained model's threshold, then save the pipeline
    model.exit_threshold = 0.7
    assert model.config.exit_threshold == 0.7
    model.save_pretrained(tmp_path)
    assert EarlyExitUViT2DModel.from_pretrained(tmp_path).exit_threshold == 0.7
    with pytest.raises(ValueError, match="`exit_threshold` must be a finite number or None, got nan"):
        model.exit_threshold = float("nan")  # refused when set, not at the next call
    assert model.exit_threshold == 0.7
    model.exit_threshold = np.float32(0.25)  # a numpy number (a quantile of measured uncertainties) saves too
    model.save_pretrained(tmp_path)
    assert EarlyExitUViT2DModel.from_pretrained(tmp_path).exit_threshold == 0.25


def test_a_threshold_set_on_the_model_is_kept_by_from_config_and_ema(model, tmp_path):
    # diffusers' `from_config` drops the keys the config lists as defaults (`_use_default_values`): a threshold set
    # after a build without one was lost by `from_config(model.config)` and by `EMAModel.save_pretrained`
    from diffusers.training_utils import EMAModel

    model.exit_threshold = 0.7
    assert EarlyExitUViT2DModel.from_config(model.config).exit_threshold == 0.7
    ema = EMAModel(model.parameters(), model_cls=EarlyExitUViT2DModel, model_config=model.config)
    ema.save_pretrained(tmp_path)
    assert EarlyExitUViT2DModel.from_pretrained(tmp_path).exit_threshold == 0.7
    model.exit_threshold = None  # back to the default: no threshold either way
    assert EarlyExitUViT2DModel.from_config(model.config).exit_threshold is None


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 3, 8, 8), (2, 1, 8, 8)])
def test_a_target_of_another_shape_than_the_prediction_is_named(model, shape):
    # each broadcast against the (2, 3, 8, 8) predictions: a loss against the wrong target, silently
    noisy, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with pytest.raises(
        ValueError, match=rf"`target` must have the predictions' shape \(2, 3, 8, 8\), got {re.escape(str(shape))}"
    ):
        early_exit_loss(model, noisy, t, torch.randn(shape))


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_group_offload_gives_the_same_outputs(model, tmp_path, threshold):
    # the exit heads too, on the early-exit path
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    _set_uncertainties(model, [0.9, 0.2, 0.1])  # with a threshold, the samples leave at the second exit head
    assert_group_offload_keeps_outputs(
        model, lambda m: m(x, t, exit_threshold=threshold).sample, tmp_path, blocks_per_group=(1,)
    )
    # groups of two exit heads were loaded only when the first ran: the second ran on weights not loaded (NaN)
    with pytest.raises(ValueError, match="`num_blocks_per_group`=2 would put several of .*`exit_heads`"):
        model.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=2)


def test_without_a_threshold_the_model_compiles_with_fullgraph(model):
    # no threshold runs every block, yet the sampling path read the host (the last exit's `done.any()`, boolean
    # indexing, the value checks): `torch.compile(fullgraph=True)` failed on a data-dependent expression
    torch._dynamo.reset()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        expected = model(x, t).sample
        assert torch.equal(compiled(x, t).sample, expected)
    assert model.last_exit_layer == TINY["num_layers"] and model.last_exit_layers.tolist() == [3, 3]
