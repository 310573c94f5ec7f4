"""Stage-aware offload (`enable_stage_offload`) on CPU: the same images as without it, and the accelerate hooks move
exactly the expected stage networks, in the expected order (the execution device is the CPU here, so the moves cost
nothing; the order and the resident set are what is checked)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler, LCMScheduler, PNDMScheduler, UNet2DModel

from diffusers_stages import DualBackbonePipeline, ExpertRoutingModel, ExpertRoutingPipeline, MultiStageUNet2DModel
from diffusers_stages.models.staged import StagedModelMixin
from diffusers_stages.pipelines.offload import StageOffload
from tests.conftest import TINY_UNET
from tests.pipelines.conftest import KINDS, tiny_pipeline

CPU = torch.device("cpu")


def _images(pipe, **kwargs) -> np.ndarray:
    kwargs = {"batch_size": 2, "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(generator=torch.manual_seed(0), **kwargs).images


@pytest.fixture
def recorded(monkeypatch):
    """The events of every `StageOffload`: ``("in" | "out", unit)`` per move and ``("call", unit, resident units)``
    per stage-network call (after the hook made it resident)."""
    events = []
    move, activate = StageOffload._move, StageOffload.activate

    def recording_move(self, unit, onload, non_blocking=False):
        events.append(("in" if onload else "out", unit))
        move(self, unit, onload, non_blocking)

    def recording_activate(self, unit):
        activate(self, unit)
        events.append(("call", unit, frozenset(self.resident)))

    monkeypatch.setattr(StageOffload, "_move", recording_move)
    monkeypatch.setattr(StageOffload, "activate", recording_activate)
    return events


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_same_images_and_one_network_resident(kind, prefetch, recorded):
    pipe = tiny_pipeline(kind, num_class_embeds=4)
    labels = {"class_labels": [0, 2], "guidance_scale": 2.0}
    expected = _images(pipe, **labels)
    pipe.enable_stage_offload(device="cpu", prefetch=prefetch)
    assert pipe._execution_device == CPU
    np.testing.assert_array_equal(_images(pipe, **labels), expected)  # bit for bit

    # the hooks sit on the stage networks themselves: decoders, experts, backbones
    offload = pipe._stage_offload
    num_stages = len(offload.unit_of_stage)
    networks = [pipe.stage_network(s) for s in range(num_stages)]
    assert [offload.units[offload.unit_of_stage[s]] for s in range(num_stages)] == networks
    if kind == "multistage":
        assert networks == list(pipe.unet.decoders)
    elif kind == "experts":
        assert networks == list(pipe.experts.experts)
    else:
        assert networks == [pipe.deep, pipe.shallow]
    assert all(hasattr(network, "_hf_hook") for network in networks)

    # the calls follow the schedule; at each call its network is resident, with at most the next one (prefetch)
    stages = [stage for _, stage in pipe.expert_schedule(4)]
    calls = [event for event in recorded if event[0] == "call"]
    assert [unit for _, unit, _ in calls] == stages
    for i, (_, unit, resident) in enumerate(calls):
        upcoming = {s for s in stages[i + 1 :] if s != unit}
        allowed = {unit, min(upcoming, key=lambda s: stages.index(s, i))} if prefetch and upcoming else {unit}
        assert unit in resident and resident <= allowed, (i, unit, resident)
        if not prefetch:
            assert resident == {unit}
    assert not offload.resident  # the run ends with every stage network offloaded


def test_move_order_of_a_three_stage_unet(recorded):
    pipe = tiny_pipeline("multistage")
    assert [stage for _, stage in pipe.expert_schedule(4)] == [2, 1, 0, 0]
    pipe.enable_stage_offload(device="cpu", prefetch=False)
    assert recorded == [("out", 0), ("out", 1), ("out", 2)]  # enabling offloads every decoder
    recorded.clear()
    _images(pipe)
    assert recorded == [
        ("in", 2), ("call", 2, {2}),
        ("out", 2), ("in", 1), ("call", 1, {1}),
        ("out", 1), ("in", 0), ("call", 0, {0}),
        ("call", 0, {0}),
        ("out", 0),
    ]  # fmt: skip

    pipe.enable_stage_offload(device="cpu")  # prefetch: the next decoder moves in after the last call before a switch
    recorded.clear()
    _images(pipe)
    assert recorded == [
        ("in", 2), ("call", 2, {2}), ("in", 1),
        ("out", 2), ("call", 1, {1}), ("in", 0),
        ("out", 1), ("call", 0, {0}),
        ("call", 0, {0}),
        ("out", 0),
    ]  # fmt: skip


def test_peak_is_the_rest_plus_the_largest_network(recorded):
    """With experts of different sizes, the parameters resident at any call are the largest expert's at most."""
    torch.manual_seed(0)
    widths = (16, 8, 8)  # the clean expert is the largest
    experts = [UNet2DModel(**{**TINY_UNET, "block_out_channels": (w, w)}).eval() for w in widths]
    pipe = ExpertRoutingPipeline(ExpertRoutingModel(experts, stage_boundaries=(300, 600)), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = _images(pipe, num_inference_steps=6)
    pipe.enable_stage_offload(device="cpu", prefetch=False)
    np.testing.assert_array_equal(_images(pipe, num_inference_steps=6), expected)
    sizes = [sum(p.numel() for p in expert.parameters()) for expert in experts]
    resident = [sum(sizes[u] for u in event[2]) for event in recorded if event[0] == "call"]
    assert max(resident) == max(sizes) and sorted(set(resident)) == sorted(set(sizes))


def test_heun_pairs_and_a_rerun(recorded):
    """A predictor/corrector pair stays with one network, and a second run re-plans from its own schedule."""
    pipe = tiny_pipeline("experts", scheduler=HeunDiscreteScheduler())
    expected = _images(pipe, num_inference_steps=3)
    pipe.enable_stage_offload(device="cpu")
    for _ in range(2):
        np.testing.assert_array_equal(_images(pipe, num_inference_steps=3), expected)
    calls = [unit for event, unit, *_ in recorded if event == "call"]
    assert calls == 2 * [stage for _, stage in pipe.expert_schedule(3)]


def test_an_unplanned_call_still_gets_its_network(recorded):
    """A stage network called outside the pipeline (the routed path of the U-Net) is moved in on demand."""
    pipe = tiny_pipeline("multistage")
    pipe.enable_stage_offload(device="cpu")
    recorded.clear()
    pipe.unet(torch.randn(3, 3, 8, 8), torch.tensor([100, 500, 900]))
    assert [event[1] for event in recorded if event[0] == "call"] == [0, 1, 2]
    assert [event for event in recorded if event[0] == "call"][-1][2] == {2}


def test_refused_with_model_cpu_offload_and_disabled():
    pipe = tiny_pipeline("dual_backbone")
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu")
    with pytest.raises(ValueError, match="`enable_model_cpu_offload` cannot be combined with `enable_stage_offload`"):
        pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="`enable_sequential_cpu_offload` cannot be combined"):
        pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="`prefetch` must be a bool, got 'yes'"):
        pipe.enable_stage_offload(device="cpu", prefetch="yes")
    with pytest.raises(ValueError, match="`device` must be a torch device .* got 'gpu0'"):
        pipe.enable_stage_offload(device="gpu0")
    with pytest.raises(ValueError, match="`offload_device` must be a torch device .* got 'disk'"):
        pipe.enable_stage_offload(device="cpu", offload_device="disk")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device` must be given on a machine without an accelerator"):
            pipe.enable_stage_offload()
    pipe.disable_stage_offload()
    assert pipe._stage_offload is None and not hasattr(pipe.deep, "_hf_hook")
    np.testing.assert_array_equal(_images(pipe), expected)

    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match=r"`enable_stage_offload` cannot be combined with .*hooked components: \["):
        pipe.enable_stage_offload(device="cpu")
    pipe.remove_all_hooks()
    pipe.enable_stage_offload(device="cpu")
    np.testing.assert_array_equal(_images(pipe), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_all_hooks_removes_the_stage_offload_too(kind):
    """diffusers' `remove_all_hooks` (the documented way out of any offload) leaves no stage hook and no stale
    offload state behind, whichever component the stage networks are (a backbone, an expert, a decoder)."""
    pipe = tiny_pipeline(kind)
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu")
    networks = list(pipe._stage_offload.units)
    pipe.remove_all_hooks()
    assert pipe._stage_offload is None and not any(hasattr(network, "_hf_hook") for network in networks)
    np.testing.assert_array_equal(_images(pipe), expected)
    pipe.enable_model_cpu_offload(device="cpu")  # nothing left in the way of diffusers' own offload
    np.testing.assert_array_equal(_images(pipe), expected)


def test_moving_an_offloaded_pipeline_is_refused_but_its_dtype_may_change():
    pipe = tiny_pipeline("experts")
    pipe.enable_stage_offload(device="cpu")
    for args, kwargs in ((("cpu",), {}), ((), {"device": "cpu"}), (("cpu", torch.float32), {})):
        with pytest.raises(ValueError, match=r"`pipe.to\(device\)` cannot be combined with `enable_stage_offload`"):
            pipe.to(*args, **kwargs)
    assert pipe._stage_offload is not None and all(hasattr(unit, "_hf_hook") for unit in pipe._stage_offload.units)
    pipe.to(torch.bfloat16)  # a dtype alone moves nothing
    assert pipe.experts.dtype == torch.bfloat16 and np.isfinite(_images(pipe)).all()
    pipe.to(dtype=torch.float32)
    pipe.disable_stage_offload()
    pipe.to("cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_from_pipe_of_an_offloaded_pipeline_is_refused(kind):
    """The stage networks (shared with the new pipeline) carry the source's hooks: the new pipeline would sample
    with another pipeline's offload state (and re-enabling there would take the hooks from the source)."""
    pipe = tiny_pipeline(kind)
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu")
    with pytest.raises(ValueError, match="`from_pipe` cannot copy a pipeline with `enable_stage_offload`"):
        type(pipe).from_pipe(pipe)
    pipe.disable_stage_offload()
    new = type(pipe).from_pipe(pipe)
    new.set_progress_bar_config(disable=True)
    new.enable_stage_offload(device="cpu")
    np.testing.assert_array_equal(_images(new), expected)


def test_a_step_fraction_switch_with_pndm_warm_up_steps():
    """PNDM with its Runge-Kutta warm-up refuses fewer than 4 steps; enabling the offload of a step-fraction dual
    backbone resolved its stages with 2 steps, and was refused with "got 2" whatever the run would use."""
    pipe = tiny_pipeline("dual_backbone", scheduler=PNDMScheduler())
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu")
    np.testing.assert_array_equal(_images(pipe), expected)


def test_a_device_this_machine_lacks_is_refused_before_anything_moves():
    """Devices torch knows but this machine lacks were an AssertionError or RuntimeError from deep inside (or, for
    "mps" on Linux, accepted until the first run), and ``offload_device="meta"`` dropped the waiting weights."""
    pipe = tiny_pipeline("experts")
    expected = _images(pipe)
    missing = [] if torch.cuda.is_available() else ["cuda", "cuda:0"]
    missing += [] if torch.backends.mps.is_available() else ["mps"]
    for device in missing:
        with pytest.raises(ValueError, match=f"`device` must be a device this machine has, got '{device}'"):
            pipe.enable_stage_offload(device=device)
        with pytest.raises(ValueError, match=f"`offload_device` must be a device this machine has, got '{device}'"):
            pipe.enable_stage_offload(device="cpu", offload_device=device)
    with pytest.raises(ValueError, match="`offload_device` must be a device this machine has, got 'meta'"):
        pipe.enable_stage_offload(device="cpu", offload_device="meta")
    assert pipe._stage_offload is None and all(p.device.type == "cpu" for p in pipe.experts.parameters())
    np.testing.assert_array_equal(_images(pipe), expected)


@pytest.mark.parametrize("multistage_expert", [0, 2])
def test_a_multi_stage_expert_is_offloaded_whole(multistage_expert, recorded):
    """An expert that is itself a multi-stage U-Net is its stage's network as a whole: its decoders are its own
    stages, not the pipeline's. Its decoder of the pipeline's stage index was taken instead (an IndexError for the
    last of 3 experts, and for the first one its encoder and other decoders never left the accelerator)."""
    torch.manual_seed(0)
    experts = [UNet2DModel(**TINY_UNET).eval() for _ in range(3)]
    experts[multistage_expert] = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(800,)).eval()
    pipe = ExpertRoutingPipeline(ExpertRoutingModel(experts, stage_boundaries=(300, 600)), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu", prefetch=False)
    assert pipe._stage_offload.units == experts and all(pipe.stage_network(s) is experts[s] for s in range(3))
    np.testing.assert_array_equal(_images(pipe), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_refused_with_group_offload_either_order(kind):
    """diffusers refuses its model and sequential offload with group offloading; stage offload moves whole networks
    too, and was accepted on a group-offloaded pipeline (and group offloading on a stage-offloaded one), each
    moving the other's weights behind its back."""
    pipe = tiny_pipeline(kind)
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu")
    with pytest.raises(ValueError, match="`enable_group_offload` cannot be combined with `enable_stage_offload`"):
        pipe.enable_group_offload(onload_device=CPU, offload_type="leaf_level")
    assert not any(pipe._maybe_raise_error_if_group_offload_active(module=c) for c in pipe._stage_offload.components)
    pipe.disable_stage_offload()
    pipe.enable_group_offload(onload_device=CPU, offload_type="leaf_level")
    with pytest.raises(ValueError, match="`enable_stage_offload` cannot be combined with group offloading"):
        pipe.enable_stage_offload(device="cpu")
    assert pipe._stage_offload is None
    np.testing.assert_array_equal(_images(pipe), expected)


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_diffusers_offload_refuses_a_bad_device_or_gpu_id_before_anything_moves(method):
    """A `device` this machine lacks was accepted and failed at the first call (an AssertionError from torch's CUDA
    stub), "mps" on Linux failed half-way through enabling, and a `gpu_id` that is not an index was a RuntimeError
    about a device string the user never wrote: each is a `ValueError` naming the argument, as `enable_stage_offload`
    gives, with the pipeline untouched."""
    pipe = tiny_pipeline("experts")
    expected = _images(pipe)
    enable = getattr(pipe, method)
    missing = [] if torch.cuda.is_available() else ["cuda"]
    missing += [] if torch.backends.mps.is_available() else ["mps"]
    for device in [*missing, "meta"]:
        with pytest.raises(ValueError, match=f"`device` must be a device this machine has, got '{device}'"):
            enable(device=device)
    with pytest.raises(ValueError, match="`device` must be a torch device such as 'cpu' or 'cuda', got 'gpu0'"):
        enable(device="gpu0")
    for gpu_id in ("x", -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"`gpu_id` must be a non-negative integer .*got {gpu_id!r}"):
            enable(gpu_id=gpu_id, device="cpu")
    assert not getattr(pipe, "_all_hooks", None) and not hasattr(pipe.experts, "_hf_hook")
    np.testing.assert_array_equal(_images(pipe), expected)


def test_a_decoder_still_frees_the_encoder_skips(monkeypatch):
    """A decoder empties the list of skips it is given, so that each skip is freed once read (`decode`): the hook
    handed the decoder a copy of the list, and the routing's list kept every skip alive to the end of the decoder."""
    left = []
    route = StagedModelMixin.route

    def recording_route(self, timesteps, stage_index, run_stage, inputs, fuse=None):
        def run(stage, stage_inputs):  # each decoder's call, and what is left of the skips it was handed
            out = run_stage(stage, stage_inputs)
            left.append(len(stage_inputs[1]))
            return out

        return route(self, timesteps, stage_index, run, inputs, fuse=fuse)

    monkeypatch.setattr(StagedModelMixin, "route", recording_route)
    pipe = tiny_pipeline("multistage")
    sample = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = pipe.unet(sample, 500, stage_index=1).sample
        pipe.enable_stage_offload(device="cpu")
        torch.testing.assert_close(pipe.unet(sample, 500, stage_index=1).sample, expected, rtol=0, atol=0)
        assert pipe.unet(sample, torch.tensor([100, 900])).sample.shape == expected.shape  # a mixed batch
    assert left == [0, 0, 0, 0]  # one call, one call, and a mixed batch's two


@pytest.mark.parametrize("kind", KINDS)
def test_networks_offloaded_by_another_pipeline_are_refused(kind):
    """A second pipeline built on the networks of a stage-offloaded one (what `from_pipe` refuses) took their hooks
    from it silently: the first pipeline's `disable_stage_offload` then removed the second's hooks, which sampled on
    with its networks left on the offload device."""
    pipe = tiny_pipeline(kind)
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu")
    other = type(pipe)(**pipe.components)
    other.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="stage networks are offloaded by another pipeline"):
        other.enable_stage_offload(device="cpu")
    assert other._stage_offload is None
    assert all(unit._hf_hook.offload is pipe._stage_offload for unit in pipe._stage_offload.units)
    np.testing.assert_array_equal(_images(pipe), expected)
    pipe.disable_stage_offload()
    other.enable_stage_offload(device="cpu")
    np.testing.assert_array_equal(_images(other), expected)


def test_a_pipeline_loaded_onto_one_device_takes_the_stage_offload(tmp_path):
    # `from_pretrained(folder, device_map="cpu")` records the device as `hf_device_map`; diffusers' own offloading
    # accepts such a pipeline (a device map of one device places nothing), the stage offload refused it
    pipe = tiny_pipeline("dual_backbone")
    expected = _images(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path, device_map="cpu")
    loaded.enable_stage_offload(device="cpu")
    np.testing.assert_array_equal(_images(loaded), expected)
    loaded.disable_stage_offload()
    loaded.hf_device_map = {"shallow": "cpu", "deep": "cuda:1"}  # components spread over devices: still refused
    with pytest.raises(ValueError, match="`enable_stage_offload` cannot be combined with .*device_map"):
        loaded.enable_stage_offload(device="cpu")


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_to_disk_keeps_each_backbone_its_own_weights(offload_type, tmp_path):
    """diffusers names a group's file after the group's name inside its component: the dual backbone's two U-Nets
    (one architecture) wrote the same files, and one backbone sampled with the other's weights."""
    pipe = tiny_pipeline("dual_backbone")
    expected = _images(pipe)
    pipe.enable_group_offload(
        onload_device=CPU, offload_type=offload_type, num_blocks_per_group=1, offload_to_disk_path=str(tmp_path)
    )
    np.testing.assert_array_equal(_images(pipe), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "shallow"]  # a folder per component


@pytest.mark.parametrize("kind", KINDS)
def test_a_pipeline_offloaded_to_disk_is_not_saved_with_its_placeholders(kind, tmp_path):
    """Group offloading to disk keeps the weights in its files and leaves uninitialised placeholders in the modules:
    `save_pretrained` wrote those, and the saved pipeline sampled garbage (NaNs)."""
    pipe = tiny_pipeline(kind)
    pipe.enable_group_offload(
        onload_device=CPU, offload_type="leaf_level", offload_to_disk_path=str(tmp_path / "disk")
    )
    _images(pipe)
    with pytest.raises(ValueError, match="cannot save .*: group offloading to disk .*`offload_to_disk_path`="):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # nothing written
    if kind != "dual_backbone":  # the package's own models refuse it too (the backbones are diffusers' UNet2DModel)
        model = pipe.unet if kind == "multistage" else pipe.experts
        with pytest.raises(ValueError, match="group offloading to disk"):
            model.save_pretrained(tmp_path / "model")
        assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_component_swapped_in_after_enabling_is_offloaded_at_the_next_run(kind, monkeypatch):
    """``pipe.unet = other`` (diffusers registers it unchecked) after `enable_stage_offload`: the hooks stayed on the
    replaced component, whose networks (and shared encoder) were left on the accelerator, and the new one ran where
    it was, on the CPU: a device mismatch on a GPU (here the stand-in accelerator of `tests/fake_cuda.py`). The next
    run now offloads the pipeline's current components, and hands the replaced one back unhooked."""
    from diffusers_stages.pipelines import offload
    from tests.fake_cuda import fake_cuda

    monkeypatch.setattr(offload, "check_device", lambda value, name: torch.device(value))  # "cuda": the stand-in
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    pipe, name = tiny_pipeline(kind), {"multistage": "unet", "experts": "experts", "dual_backbone": "deep"}[kind]
    expected = _images(pipe, output_type="pt")
    new = getattr(tiny_pipeline(kind), name)  # the same weights (same seed), never offloaded
    with fake_cuda():
        pipe.enable_stage_offload(device="cuda")
        old, old_networks = getattr(pipe, name), list(pipe._stage_offload.units)
        setattr(pipe, name, new)
        torch.testing.assert_close(_images(pipe, output_type="pt").cpu(), expected, rtol=1e-4, atol=1e-4)
        networks = [pipe.stage_network(s) for s in range(len(pipe._stage_offload.unit_of_stage))]
        assert all(network._hf_hook.offload is pipe._stage_offload for network in networks)
        replaced = [network for network in old_networks if not any(network is n for n in networks)]
        assert replaced and not any(hasattr(network, "_hf_hook") for network in replaced)
        assert {p.device.type for p in old.parameters()} == {"cpu"}  # the replaced component left the accelerator
        pipe.disable_stage_offload()
    assert {p.device.type for p in new.parameters()} == {"cpu"}


@pytest.mark.parametrize(
    "scheduler",
    [DDIMScheduler(num_train_timesteps=40), LCMScheduler(original_inference_steps=8)],
    ids=["40 training steps", "LCM of 8 steps"],
)
def test_a_step_fraction_switch_takes_the_stage_offload_with_a_scheduler_that_cannot_take_50_steps(scheduler):
    # the dual backbone's default switch (a step fraction) was resolved for 50 steps, `__call__`'s default, only to
    # count the stages: a scheduler that cannot take 50 steps failed `enable_stage_offload` with "`num_inference_steps`:
    # 50 cannot be larger than ..." (or LCM's "original_steps x strength: 8 x 1.0 ..."), a run the user never asked for
    torch.manual_seed(0)
    shallow, deep = UNet2DModel(**TINY_UNET).eval(), UNet2DModel(**TINY_UNET).eval()
    pipe = DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = _images(pipe)
    pipe.enable_stage_offload(device="cpu")
    assert [pipe._stage_offload.units[unit] for unit in pipe._stage_offload.unit_of_stage] == [deep, shallow]
    np.testing.assert_array_equal(_images(pipe), expected)
