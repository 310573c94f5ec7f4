import copy
import math
import pickle

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMapEulerDiscreteScheduler,
)

from diffusers_stages import StageRouter, TimestepPartition


def test_stage_lookup_matches_half_open_intervals():
    partition = TimestepPartition([442, 631])
    t = torch.tensor([0, 1, 441, 442, 443, 630, 631, 999, 1000])
    assert partition.stage_for_noise_level(t).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert partition.stage_for_noise_level(torch.tensor([441.999, 442.0])).tolist() == [0, 1]
    assert partition.num_stages == 3
    assert partition.intervals() == [(0.0, 442.0), (442.0, 631.0), (631.0, 1000.0)]


def test_single_stage_and_uniform():
    assert TimestepPartition([]).stage_for_noise_level(torch.tensor([0, 999])).tolist() == [0, 0]
    uniform = TimestepPartition.uniform(4)
    assert uniform.boundaries == (250.0, 500.0, 750.0)
    assert TimestepPartition.from_fractions([0.442, 0.631]).boundaries == pytest.approx((442.0, 631.0))


def test_config_round_trip():
    partition = TimestepPartition([2.5103, 7.6577], units="sigma")
    assert TimestepPartition.from_config(partition.to_config()) == partition


def test_sigma_units_read_edm_noise_conditioning():
    partition = TimestepPartition([2.5103, 7.6577], units="sigma")
    c_noise = torch.log(torch.tensor([0.002, 2.0, 3.0, 80.0])) / 4  # what diffusers' EDM schedulers pass
    assert partition.stage_for_timestep(c_noise).tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(boundaries=[631, 442]), "boundaries"),
        (dict(boundaries=[442, 442]), "boundaries"),
        (dict(boundaries=[0, 500]), "boundaries"),
        (dict(boundaries=[500, 1000]), "boundaries"),
        (dict(boundaries=[math.nan]), "boundaries"),
        (dict(boundaries=["a"]), "boundaries"),
        (dict(boundaries=[-1.0], units="sigma"), "boundaries"),
        (dict(boundaries=[500], units="seconds"), "units"),
        (dict(boundaries=[500], num_train_timesteps=0), "num_train_timesteps"),
    ],
)
def test_bad_partitions_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        TimestepPartition(**kwargs)


@pytest.mark.parametrize("boundaries", ["500", ["300", "600"], [True]])
def test_strings_and_bools_are_not_boundaries(boundaries):
    # refused, not read character by character ("500" -> 5, 0, 0) or converted silently
    with pytest.raises(ValueError, match="`boundaries` must be a sequence of numbers"):
        TimestepPartition(boundaries)


def test_noise_level_out_of_range_is_an_error():
    partition = TimestepPartition([500])
    with pytest.raises(ValueError, match="`timestep`.*1001"):
        partition.stage_for_noise_level(torch.tensor([10, 1001]))
    with pytest.raises(ValueError, match="`timestep`"):
        partition.stage_for_noise_level(torch.tensor([-1]))


def test_sigma_boundaries_route_as_the_authors_edm_code_exactly_at_and_beside_each_boundary():
    # the original picks the last stage whose lower bound sigma exceeds: a boundary belongs to the cleaner stage
    from diffusers import EDMEulerScheduler

    boundaries = (1.0, 10.0)
    partition = TimestepPartition(boundaries, units="sigma")
    scheduler = EDMEulerScheduler()

    def original(sigma: float) -> int:
        return max(s for s, low in enumerate((0.0, *boundaries)) if sigma > low)

    # float32 c_noise resolves sigma to about 2.4e-7 relative: levels 1e-6 beside a boundary are told apart
    sigmas = [torch.tensor(b * f, dtype=torch.float32) for b in boundaries for f in (1 - 1e-6, 1.0, 1 + 1e-6)]
    for sigma in sigmas:
        c_noise = scheduler.precondition_noise(sigma.reshape(1))  # what the scheduler hands the model
        assert int(partition.stage_for_timestep(c_noise)[0]) == original(float(sigma)), float(sigma)
        assert int(partition.stage_for_noise_level(sigma.double())) == original(float(sigma))


def test_timestep_boundaries_belong_to_the_noisier_stage():
    assert TimestepPartition([442, 631]).stage_for_timestep(torch.tensor([441.999, 442, 630, 631])).tolist() == [
        0,
        1,
        1,
        2,
    ]


def test_stage_index_is_a_deprecated_alias_of_stage_for_noise_level():
    partition = TimestepPartition([442, 631])
    levels = torch.tensor([0, 441, 442, 999])
    with pytest.warns(FutureWarning, match="stage_for_noise_level"):
        assert torch.equal(partition.stage_index(levels), partition.stage_for_noise_level(levels))


@pytest.mark.parametrize("boundaries", ["500", "1", 500, None])
def test_boundaries_that_are_not_a_sequence_of_numbers_are_refused(boundaries):
    # a string was read character by character ("1" was the boundary 1.0, "500" the unsorted 5, 0, 0)
    with pytest.raises(ValueError, match=f"`boundaries` must be a sequence of numbers, got {boundaries!r}"):
        TimestepPartition(boundaries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_timestep_is_routed_by_its_value_whatever_its_dtype(dtype):
    # boundaries that the dtype cannot hold were rounded into it: 442.00001 became 442.0 in float32, and 633 became
    # 632 in bfloat16, so the timestep 442.0 (or 632) went to the noisier stage although it lies below the boundary
    for boundary in (442.00001, 631.2, 633.0, 300.9902699737328):
        partition = TimestepPartition([boundary])
        values = torch.tensor([boundary], dtype=torch.float64).to(dtype)
        values = torch.cat([values, torch.nextafter(values, torch.full_like(values, 0.0))])
        values = torch.cat([values, torch.nextafter(values[:1], torch.full_like(values[:1], 1e4))])
        expected = [int(v >= boundary) for v in values.double().tolist()]
        assert partition.stage_for_timestep(values).tolist() == expected, (boundary, values)
        assert [int(partition.stage_for_timestep(float(v))) for v in values] == expected  # as expert_schedule reads it


def test_a_sigma_on_a_boundary_is_routed_by_its_value_whatever_its_dtype():
    partition = TimestepPartition([0.1, 2.5103], units="sigma")  # neither is a float32 value
    for s, boundary in enumerate(partition.boundaries):
        values = torch.tensor([boundary], dtype=torch.float64).float()  # the boundary rounded to float32
        values = torch.cat([values, torch.nextafter(values, torch.zeros(1))])
        # on the boundary or within float32 rounding of it: the cleaner stage, as the model routes its c_noise
        assert partition.stage_for_noise_level(values).tolist() == [s, s], (boundary, values)
        for dtype in (torch.float16, torch.bfloat16):  # their roundings lie farther off: compared by their value
            values = torch.tensor([boundary], dtype=torch.float64).to(dtype)
            values = torch.cat([values, torch.nextafter(values, torch.zeros(1, dtype=dtype))])
            expected = [sum(v > b for b in partition.boundaries) for v in values.double().tolist()]
            assert partition.stage_for_noise_level(values).tolist() == expected, (boundary, values)
        beside = torch.tensor([boundary * (1 - 1e-6), boundary * (1 + 1e-6)], dtype=torch.float32)
        assert partition.stage_for_noise_level(beside).tolist() == [s, s + 1], (boundary, beside)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TimestepPartition.uniform(True), "`num_stages` must be a positive integer, got True"),
        (lambda: TimestepPartition.uniform(3, "1000"), "`num_train_timesteps` must be a positive integer, got '1000'"),
        (lambda: TimestepPartition.uniform(3, 1000.0), "`num_train_timesteps` must be a positive integer, got 1000.0"),
        (lambda: TimestepPartition.from_fractions(["a"]), "`fractions` must be a sequence of numbers"),
        (lambda: TimestepPartition.from_fractions(0.5), "`fractions` must be a sequence of numbers, got 0.5"),
        (lambda: TimestepPartition.from_fractions([True]), "`fractions` must be a sequence of numbers"),
        (lambda: TimestepPartition.from_fractions([0.5], 0), "`num_train_timesteps` must be a positive integer"),
    ],
)
def test_constructors_name_a_bad_argument(build, match):
    # uniform(True) was one stage, from_fractions([True]) the boundary 1000 refused as outside the schedule, and the
    # others raised TypeError or float()'s ValueError without the argument's name
    with pytest.raises(ValueError, match=match):
        build()


def test_integer_timesteps_route_without_float64_where_the_device_has_none(monkeypatch):
    # Apple's MPS has no float64: integer timesteps (every DDPM-style scheduler's, on the pipeline's device) were
    # compared in float64 on their own device, which fails there; they are compared in `exact_float(device)`
    import diffusers_stages.partition as partition_module

    assert partition_module.exact_float("mps") == torch.float32
    assert partition_module.exact_float(torch.device("cpu")) == torch.float64
    timesteps = torch.arange(0, 1001)
    boundaries = [300.9902699737328, 442.00001, 631.2, 633.0]
    expected = TimestepPartition(boundaries).stage_for_timestep(timesteps)
    assert expected.tolist() == [sum(int(t) >= b for b in boundaries) for t in timesteps]
    seen = []
    monkeypatch.setattr(partition_module, "exact_float", lambda device: seen.append(device) or torch.float32)
    assert torch.equal(TimestepPartition(boundaries).stage_for_timestep(timesteps), expected)  # as on MPS
    sigma = TimestepPartition([0.5, 2.0], units="sigma")
    assert sigma.noise_level(torch.tensor([0])).dtype == torch.float32  # c_noise 0: sigma 1
    assert sigma.stage_for_timestep(torch.tensor([-1, 0, 1])).tolist() == [0, 1, 2]  # sigma e^-4, 1, e^4
    assert seen and all(torch.device(d).type == "cpu" for d in seen)


def test_a_python_number_is_routed_by_its_own_value():
    # a Python float became a float32 tensor (torch's default dtype) in stage_for_noise_level and StageRouter:
    # 441.99999 rounded up to 442.0 and went to the noisier stage, while stage_for_timestep (float64) said stage 0
    partition = TimestepPartition([442])
    assert int(partition.stage_for_noise_level(441.99999)) == 0
    assert partition.stage_for_noise_level([441.99999, 442.0]).tolist() == [0, 1]
    assert StageRouter(partition, DDIMScheduler())(441.99999) == 0
    # expert_schedule routes the float of each scheduler timestep: a float64 one (FlowMapEulerDiscreteScheduler) must
    # route as the model routes the tensor itself, also where its float32 rounding lies across the boundary
    scheduler = FlowMapEulerDiscreteScheduler()
    scheduler.set_timesteps(7)
    t = scheduler.timesteps[1]
    assert t.dtype == torch.float64 and t.float().double() != t
    boundary = float((t + t.float().double()) / 2)  # between the value and its float32 rounding
    partition = TimestepPartition([boundary])
    expected = int(partition.stage_for_timestep(t.reshape(1))[0])
    assert StageRouter(partition, scheduler)(float(t), is_corrector=False) == expected
    sigma = TimestepPartition([2.0], units="sigma")
    c_noise = 0.25 * math.log(2.0)  # on the boundary, computed in float64: the cleaner stage
    assert int(sigma.stage_for_timestep(c_noise)) == int(sigma.stage_for_noise_level(2.0)) == 0


@pytest.mark.parametrize("scheduler_class", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_a_sampled_sigma_on_a_boundary_routes_alike_as_a_tensor_and_as_a_float(scheduler_class):
    # a boundary on a sigma the scheduler samples: the model routed the float32 c_noise against ln(b)/4 computed in
    # float32 (the cleaner stage), expert_schedule (StageRouter) its float against ln(b)/4 in float64, where about half
    # the float32 roundings lie above it (the noisier stage): the pipeline ran one decoder, a plain loop the other
    scheduler = scheduler_class()
    scheduler.set_timesteps(12)
    for sigma, t in zip(scheduler.sigmas[1:-2].tolist(), scheduler.timesteps[1:-1]):
        # on the boundary, and the boundary within float32 rounding of it, on either side
        for boundary in (sigma, sigma * (1 + 2**-26), sigma * (1 - 2**-26)):
            partition = TimestepPartition([boundary], units="sigma")
            direct = int(partition.stage_for_timestep(t.reshape(1))[0])  # as the model routes the scheduler's tensor
            assert StageRouter(partition, scheduler)(float(t), is_corrector=False) == direct, (sigma, boundary)
            assert int(partition.stage_for_timestep(float(t))) == direct, (sigma, boundary)
            assert direct == 0, (sigma, boundary)  # a level on its boundary belongs to the cleaner stage
        # a float32 log of another library (CUDA's logf, accurate to one ulp) may round ln(sigma)/4 up instead
        exact = torch.tensor([0.25 * math.log(sigma)], dtype=torch.float64)
        above = (
            exact.float() if float(exact.float()) >= float(exact) else torch.nextafter(exact.float(), torch.ones(1))
        )
        assert int(TimestepPartition([sigma], units="sigma").stage_for_timestep(above)[0]) == 0, sigma


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"stage_boundaries": [600, 300]}, "`stage_boundaries` must be strictly increasing, got [600, 300]"),
        ({"stage_boundaries": "500"}, "`stage_boundaries` must be a sequence of numbers, got '500'"),
        ({"boundary_units": "steps"}, "`boundary_units` must be one of"),
    ],
)
def test_from_config_names_the_config_keys(config, message):
    # a model's arguments and saved configs say `stage_boundaries` and `boundary_units`: the errors named the
    # partition's own `boundaries` and `units`, which a user of a model never wrote
    from diffusers_stages.models.unet_multistage_ddpmpp import MultiStageDDPMppUNet2DModel

    full = {"stage_boundaries": [300], "num_train_timesteps": 1000, "boundary_units": "timestep", **config}
    with pytest.raises(ValueError) as error:
        TimestepPartition.from_config(full)
    assert message in str(error.value)
    with pytest.raises(ValueError) as error:  # a model built with such arguments says the same
        MultiStageDDPMppUNet2DModel(**{k: v for k, v in config.items()})
    assert message in str(error.value)


@pytest.mark.parametrize("boundary", [7.6577, 2.5103, 0.1, 1.0])
def test_a_sigma_level_goes_to_the_stage_its_c_noise_is_routed_to(boundary):
    # the float32 sigma 7.6577 (7.65770006, within float32 rounding of the boundary) went to the noisier stage in
    # stage_for_noise_level, compared by its exact value, while the model, routing the c_noise the EDM scheduler
    # hands it, ran the cleaner stage: training logged its loss under the other stage (training/loop.py)
    from diffusers import EDMEulerScheduler

    partition = TimestepPartition([boundary], units="sigma")
    level = torch.tensor([boundary], dtype=torch.float64).float()
    sigmas = [level]
    for direction in (0.0, 100.0):
        for _ in range(8):
            sigmas.append(torch.nextafter(sigmas[-1], torch.full_like(level, direction)))
    sigmas = torch.cat(sigmas)
    c_noise = EDMEulerScheduler().precondition_noise(sigmas)  # what a model is called with
    expected = partition.stage_for_timestep(c_noise)
    assert partition.stage_for_noise_level(sigmas).tolist() == expected.tolist()
    assert int(partition.stage_for_noise_level(level)) == 0  # on (or within float32 rounding of) the boundary
    assert int(partition.stage_for_noise_level(boundary)) == 0  # the exact value, in float64
    assert (
        partition.stage_for_noise_level(sigmas.double()).tolist()
        == partition.stage_for_timestep(0.25 * torch.log(sigmas.double())).tolist()
    )


def test_a_stage_interval_is_written_with_the_brackets_of_its_units():
    # sigma stages are (b_{s-1}, b_s]: messages and model cards wrote them [b_{s-1}, b_s), the timestep convention
    sigma = TimestepPartition([2.5103, 7.6577], units="sigma")
    assert [sigma.interval_text(s) for s in range(3)] == ["(0, 2.5103]", "(2.5103, 7.6577]", "(7.6577, inf)"]
    timestep = TimestepPartition([442, 631])
    assert [timestep.interval_text(s, ".1f") for s in range(3)] == [
        "[0.0, 442.0)",
        "[442.0, 631.0)",
        "[631.0, 1000.0)",
    ]


@pytest.mark.parametrize(
    ("stage", "format_spec", "match"),
    [(3, "g", r"`stage` must be a stage index in \[0, 3\), got 3"),
     (-1, "g", r"`stage` must be a stage index in \[0, 3\), got -1"),
     (True, "g", r"`stage` must be a stage index in \[0, 3\), got True"),
     (1.0, "g", r"`stage` must be a stage index in \[0, 3\), got 1.0"),
     (1, "q", r"`format_spec` must be a format specification of floats \('g', '.6g', ...\), got 'q'")],
)  # fmt: skip
def test_interval_text_refuses_a_bad_stage_or_format_naming_it(stage, format_spec, match):
    # were: an IndexError, a negative index counted from the end, or Python's "Unknown format code" naming neither
    with pytest.raises(ValueError, match=match):
        TimestepPartition([442, 631]).interval_text(stage, format_spec)


def test_boundaries_given_as_an_iterator_are_all_read():
    # a generator was read once by the type check and then gave no boundaries: `TimestepPartition(b for b in [442,
    # 631])` was one stage, silently (from_fractions likewise)
    assert TimestepPartition(b for b in [442, 631]) == TimestepPartition([442, 631])
    assert TimestepPartition(iter([2.5, 7.5]), units="sigma").boundaries == (2.5, 7.5)
    assert TimestepPartition.from_fractions(f for f in [0.442, 0.631]) == TimestepPartition.from_fractions(
        [0.442, 0.631]
    )
    with pytest.raises(ValueError, match=r"`boundaries` must be strictly increasing, got \[631, 442\]"):
        TimestepPartition(b for b in [631, 442])


@pytest.mark.parametrize("fractions", [[0.631, 0.442], [0.5, 0.5]])
def test_from_fractions_names_fractions_that_are_not_increasing(fractions):
    # the error was "`boundaries` must be strictly increasing, got [631.0, 442.0]": an argument and values the caller
    # never wrote
    with pytest.raises(ValueError, match=rf"`fractions` must be strictly increasing, got \[{fractions[0]}, "):
        TimestepPartition.from_fractions(fractions)


@pytest.mark.parametrize("missing", ["stage_boundaries", "num_train_timesteps", "boundary_units"])
def test_from_config_names_a_missing_key(missing):
    # a config without one of the keys raised a bare KeyError (e.g. KeyError: 'boundary_units'), where the docstring
    # promises a ValueError naming the keys; a training source's edited config.json then failed with a traceback
    config = {k: v for k, v in TimestepPartition([442, 631]).to_config().items() if k != missing}
    with pytest.raises(
        ValueError,
        match=rf"needs `stage_boundaries`, `num_train_timesteps` and `boundary_units`; "
        rf"the config lacks \['{missing}'\]",
    ):
        TimestepPartition.from_config(config)
    with pytest.raises(ValueError, match=rf"lacks \['{missing}'\]"):
        TimestepPartition.from_config(**config)


def test_numpy_integers_are_taken_as_stage_and_schedule_lengths():
    # np.int64(1000) was refused as "`num_train_timesteps` must be a positive integer, got np.int64(1000)", where the
    # package's other integer arguments take numpy's integers (positive_integer_arguments)
    import json

    import numpy as np

    partition = TimestepPartition([442, 631], np.int64(1000))
    assert partition == TimestepPartition([442, 631]) and type(partition.num_train_timesteps) is int
    json.dumps(partition.to_config())
    assert TimestepPartition.uniform(np.int64(4), np.int32(1000)) == TimestepPartition.uniform(4)
    assert TimestepPartition.from_fractions([0.5], np.int64(10)) == TimestepPartition([5], 10)
    with pytest.raises(ValueError, match="`num_stages` must be a positive integer, got np.True_"):
        TimestepPartition.uniform(np.True_)
    with pytest.raises(ValueError, match="`num_train_timesteps` must be a positive integer, got np.int64"):
        TimestepPartition([1], np.int64(0))


@pytest.mark.parametrize(
    "timestep",
    [None, "500", [500, None], True, [True, False], torch.tensor([True]), torch.tensor([500 + 0j]), object()],
)
def test_a_timestep_that_is_not_a_number_is_refused_by_name(timestep):
    # None and "500" raised torch's TypeError ("must be real number, not NoneType", "new(): invalid data type
    # 'str'"), a complex tensor a NotImplementedError of aminmax, and bools were routed as the timesteps 0 and 1
    partition = TimestepPartition([442, 631])
    sigma = TimestepPartition([2.5], units="sigma")
    for lookup in (
        partition.stage_for_timestep,
        partition.stage_for_noise_level,
        partition.noise_level,
        sigma.stage_for_timestep,
        sigma.stage_for_noise_level,
    ):
        with pytest.raises(ValueError, match="`timestep` must be a number, or a tensor or sequence of numbers, got"):
            lookup(timestep)


def test_a_config_with_a_numpy_schedule_length_is_refused_with_a_hint():
    # once the constructor took np.int64(1000) (a call argument), a model built with it held np.int64 in its config
    # and failed at save_pretrained ("Object of type int64 is not JSON serializable"); a config value is refused with
    # the package's hint, as `check_positive_integers` refuses the models' other numpy integers
    import numpy as np

    from diffusers_stages import MultiStageUNet2DModel

    hint = r"`num_train_timesteps` must be a positive integer \(a Python int: the config is saved as JSON; pass int"
    with pytest.raises(ValueError, match=hint):
        TimestepPartition.from_config(
            stage_boundaries=[442], num_train_timesteps=np.int64(1000), boundary_units="timestep"
        )
    with pytest.raises(ValueError, match=hint):
        MultiStageUNet2DModel(num_train_timesteps=np.int64(1000))
    assert TimestepPartition.from_config(stage_boundaries=[442], num_train_timesteps=1000, boundary_units="timestep")


def test_a_partition_is_read_only_and_hashable_as_it_compares():
    # its attributes could be reassigned after a lookup, which kept routing by the old boundaries (the lookup
    # tensors are cached) while `boundaries` and `to_config()` said otherwise; and it could not key a dict or set
    partition = TimestepPartition([442, 631])
    partition.stage_for_noise_level(torch.tensor([500]))
    for name, value in (("boundaries", (500.0,)), ("num_train_timesteps", 10), ("units", "sigma")):
        with pytest.raises(AttributeError):
            setattr(partition, name, value)
    assert partition.boundaries == (442.0, 631.0) and partition.stage_for_noise_level(500).item() == 1
    same, other = TimestepPartition((442.0, 631.0), 1000), TimestepPartition([442, 631], units="sigma")
    assert same == partition and hash(same) == hash(partition)
    assert other != partition and len({partition, same, other}) == 2
    # copies and pickles stay equal, and route alike
    for copied in (copy.deepcopy(partition), pickle.loads(pickle.dumps(partition))):
        assert copied == partition and hash(copied) == hash(partition)
        assert copied.stage_for_noise_level(torch.tensor([441, 442])).tolist() == [0, 1]
    # a partition pickled before (plain attributes in its state) loads as the same partition
    old = TimestepPartition.__new__(TimestepPartition)
    old.__setstate__({"boundaries": (442.0, 631.0), "num_train_timesteps": 1000, "units": "timestep", "_bounds": {}})
    assert old == partition and old.stage_for_noise_level(442).item() == 1
