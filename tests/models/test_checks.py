"""The forward-input checks every model shares: clear `ValueError`s, and no tensor value read unless asked."""

import math
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import MultiStageUNet2DModel, TimestepPartition
from diffusers_stages.models.checks import (
    check_class_labels,
    check_options,
    check_positive_integers,
    check_sample,
    compute_dtype,
    per_sample_timesteps,
    positive_integer_arguments,
)

CPU = torch.device("cpu")


def test_compute_dtype_agrees_with_model_dtype_without_walking_the_model(tiny_multistage, tiny_unet_kwargs):
    assert compute_dtype(tiny_multistage) == tiny_multistage.dtype == torch.float32
    assert compute_dtype(tiny_multistage.to(torch.bfloat16)) == tiny_multistage.dtype == torch.bfloat16
    # layerwise casting stores weights in float8: the dtype that counts is the one the layers compute in
    unet = UNet2DModel(**tiny_unet_kwargs)
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert unet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert compute_dtype(unet) == unet.dtype == torch.bfloat16
    assert compute_dtype(torch.nn.ReLU()) == torch.get_default_dtype()  # nothing to read


@pytest.mark.parametrize(
    ("timestep", "dtype", "values"),
    [
        (7, torch.long, [7, 7, 7]),
        (0.25, torch.float64, [0.25] * 3),  # python floats are not truncated (EDM's c_noise is fractional)
        (torch.tensor(5), torch.long, [5] * 3),
        (torch.tensor([2.5]), torch.float32, [2.5] * 3),
        (torch.tensor([1, 2, 3]), torch.long, [1, 2, 3]),
    ],
)
def test_per_sample_timesteps_gives_one_per_sample(timestep, dtype, values):
    timesteps = per_sample_timesteps(timestep, 3, CPU, check_values=True)
    assert timesteps.dtype == dtype and timesteps.tolist() == values


def test_a_python_float_timestep_keeps_its_value_for_the_routing():
    # a Python float was read as float32: 441.99999 became 442.0, which a model routed to the noisier stage of a
    # boundary at 442 while the partition (and the pipelines' schedule) put 441.99999 below it; it is read in float64
    # now, as diffusers' UNet2DConditionModel reads one (float32 on Apple's MPS, which has no float64)
    timesteps = per_sample_timesteps(441.99999, 2, CPU, check_values=True)
    assert timesteps.tolist() == [441.99999] * 2
    partition = TimestepPartition([442])
    assert partition.stage_for_timestep(timesteps).tolist() == [int(partition.stage_for_timestep(441.99999))] * 2


@pytest.mark.parametrize(
    ("timestep", "message"),
    [
        (torch.tensor([1, 2]), r"one value or one per sample \(3\).*got shape \(2,\)"),
        (torch.ones(3, 1), r"got shape \(3, 1\)"),
        (torch.tensor([]), r"got shape \(0,\)"),
        (torch.tensor(True), "real numbers, got dtype torch.bool"),
        (True, "a number or a tensor, got bool"),
        ("500", "a number or a tensor, got str"),
        (math.nan, "finite, got nan"),
        (-math.inf, "finite, got -inf"),
        (torch.tensor([1.0, math.nan, 2.0]), r"finite, got \[1.0, nan, 2.0\]"),
        (torch.full((3,), math.inf), r"finite, got \[inf, inf, inf\]"),
    ],
)
def test_bad_timesteps_name_the_argument_and_value(timestep, message):
    with pytest.raises(ValueError, match=f"`timestep` must .*{message}"):
        per_sample_timesteps(timestep, 3, CPU, check_values=True)


def test_python_number_timesteps_compile_with_fullgraph():
    # as UNet2DModel: a sampling loop of Python numbers under torch.compile(fullgraph=True); dynamo makes a number
    # that changes between calls (700, then 701) symbolic, and `math.isfinite` of it was a graph break (an error)
    def timesteps(x: torch.Tensor, t: float) -> torch.Tensor:
        return per_sample_timesteps(t, x.shape[0], x.device, check_values=False)

    compiled = torch.compile(timesteps, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    for t in (700, 701, 700.5, 3.25):
        got, expected = compiled(x, t), timesteps(x, t)
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_timestep_values_are_only_read_when_asked():
    # the stage_index path: shapes are checked, values are left to the caller (no host read)
    assert per_sample_timesteps(torch.tensor(math.nan), 2, CPU, check_values=False).isnan().all()


@pytest.mark.parametrize(
    ("sample", "kwargs", "message"),
    [
        ([[0.0]], {}, "floating-point tensor, got list"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.long), {}, "floating-point tensor, got dtype torch.int64"),
        (torch.zeros(3, 8, 8), {}, r"\(batch, 3, height, width\), batch >= 1, got \(3, 8, 8\)"),
        (torch.zeros(1, 4, 8, 8), {}, r"got \(1, 4, 8, 8\)"),
        (torch.zeros(0, 3, 8, 8), {}, r"got \(0, 3, 8, 8\)"),
        (torch.zeros(1, 3, 12, 8), {"multiple_of": 8}, r"multiples of 8 \(the model halves them 3 times\)"),
        (torch.zeros(1, 3, 8, 16), {"size": 8}, r"must be 8x8 .*got shape \(1, 3, 8, 16\)"),
        (torch.zeros(()), {"in_channels": None}, r"\(batch, \.\.\.\) with batch >= 1, got \(\)"),
    ],
)
def test_bad_samples_name_the_argument_and_shape(sample, kwargs, message):
    kwargs = {"in_channels": 3, **kwargs}
    with pytest.raises(ValueError, match=f"`sample`.*{message}"):
        check_sample(sample, **kwargs)


def test_good_samples_pass():
    check_sample(torch.zeros(2, 3, 16, 8), 3, multiple_of=8)
    check_sample(torch.zeros(2, 5), None)


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (None, {}, "must be given: this model is class-conditional"),
        (torch.tensor([0, 1]), {"conditional": False}, "were given, but this model has no class embedding"),
        ([0, 1], {}, "must be a tensor, got list"),
        (torch.tensor([0, 1, 2]), {}, r"one label or one per sample \(2\), got shape \(3,\)"),
        (torch.tensor([0.0, 1.0]), {}, "integer class indices, got dtype torch.float32"),
        (torch.tensor([True, False]), {}, "integer class indices, got dtype torch.bool"),
        # an embedding table takes int64/int32 indices only: was torch's RuntimeError inside nn.Embedding
        (torch.tensor([0, 1], dtype=torch.uint8), {}, r"int64 \(or int32\) class indices, got dtype torch.uint8"),
        (torch.tensor([0, 1], dtype=torch.int16), {}, r"got dtype torch.int16: pass `class_labels.long\(\)`"),
        (torch.tensor([[0], [1]]), {}, r"class indices of shape \(2,\), got shape \(2, 1\)"),
        (torch.tensor([0, 5]), {}, r"class indices in \[0, 5\), got \[0, 5\]"),
        (torch.tensor(-1), {}, r"class indices in \[0, 5\), got \[-1\]"),
        (torch.zeros(2, 3), {"one_hot": True}, r"one-hot rows must have shape \(2, 4\), got \(2, 3\)"),
        (torch.tensor([0.5, 1.0]), {"one_hot": True}, r"one-hot rows must have shape \(2, 4\)"),
    ],
)
def test_bad_class_labels_name_the_argument_and_value(labels, kwargs, message):
    kwargs = {"conditional": True, "num_labels": 5, "check_values": True, **kwargs}
    with pytest.raises(ValueError, match=f"`class_labels` .*{message}"):
        check_class_labels(labels, 2, **kwargs)


def test_good_class_labels_pass_and_values_are_only_read_when_asked():
    for labels in (torch.tensor([0, 4]), torch.tensor([3]), torch.tensor(1), torch.tensor([1, 2], dtype=torch.int32)):
        check_class_labels(labels, 2, True, 5, check_values=True)
    check_class_labels(torch.eye(4)[:2], 2, True, 5, check_values=True, one_hot=True)
    # indices compared with one-hot columns (EDM's DDPM++) may have any integer dtype
    check_class_labels(torch.tensor([0, 4], dtype=torch.uint8), 2, True, 5, check_values=True, one_hot=True)
    check_class_labels(torch.randn(2, 16), 2, True, None, check_values=True)  # "identity" class embeddings
    check_class_labels(None, 2, False, None, check_values=True)
    check_class_labels(torch.tensor([0, 99]), 2, True, 5, check_values=False)  # the stage_index path reads no value


def test_python_float_timesteps_reach_a_sigma_model_untruncated(tiny_unet_kwargs):
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=(2.0,), boundary_units="sigma").eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, 0.3).sample, model(x, torch.tensor(0.3)).sample)
        assert not torch.allclose(model(x, 0.3).sample, model(x, 0).sample)


def test_call_arguments_take_numpy_integers_as_python_ints_and_configs_say_why_not():
    values = positive_integer_arguments(("max_images",), batch_size=np.int64(2), steps=np.uint8(4), max_images=None)
    assert values == (2, 4, None) and all(type(v) is int for v in values[:2])
    for bad in (np.bool_(True), True, 2.0, np.float32(2), np.int64(0)):
        with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, got "):
            positive_integer_arguments(batch_size=bad)
    # a config is saved as JSON: a numpy integer stays refused there, with the reason
    with pytest.raises(ValueError, match=r"`in_channels` must be a positive integer \(a Python int: the config is"):
        check_positive_integers(in_channels=np.int64(3))


@pytest.mark.parametrize(
    "name, value",
    [
        ("freq_shift", "1"),  # a TypeError in the first forward (the time projection divides by it)
        ("freq_shift", math.nan),  # every time embedding NaN, silently
        ("freq_shift", True),
        ("downsample_padding", -1),  # a shape error in the first forward
        ("downsample_padding", 1.0),
        ("downsample_padding", True),
        ("mid_block_scale_factor", math.nan),  # every output NaN, silently
        ("mid_block_scale_factor", 0),  # a division by zero: every output inf or NaN
        ("mid_block_scale_factor", "1"),
        ("resnet_out_scale_factor", math.inf),
        ("center_input_sample", 1),  # a flag: True or False, not an integer or a string ("no" is truthy)
        ("flip_sin_to_cos", "no"),
        ("qkv_bias", np.bool_(True)),  # not JSON: the config could not be saved
        ("act_fn", "foo"),
        ("time_embedding_act_fn", "foo"),
        ("resnet_time_scale_shift", "spatial"),  # diffusers' ResnetBlock2D takes only these two
    ],
)
def test_model_options_name_the_argument_and_the_value(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be .*, got {re.escape(repr(value))}"):
        check_options(**{name: value})


def test_good_model_options_pass():
    check_options(freq_shift=1, downsample_padding=0, mid_block_scale_factor=math.sqrt(2), center_input_sample=True)
    check_options(freq_shift=0.5, flip_sin_to_cos=False, resnet_out_scale_factor=1)
    check_options(
        act_fn="SiLU", time_embedding_act_fn=None, timestep_post_act="gelu", resnet_time_scale_shift="default"
    )
