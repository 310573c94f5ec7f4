"""The package on a stand-in accelerator (`tests.fake_cuda`): models, routing, sampling and training losses with
every tensor on "cuda", where a CPU-only mix, a ``.numpy()`` of a device tensor or a CPU generator for a device
draw fails as it would on a GPU."""

import diffusers
import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel

from diffusers_stages import (
    ExpertRoutingModel,
    MultiStageDDPMppUNet2DModel,
    MultiStageUNet2DConditionModel,
    MultiStageUNet2DModel,
    TimestepPartition,
    UViT2DModel,
)
from diffusers_stages.models.early_exit import EarlyExitUViT2DModel, early_exit_loss
from diffusers_stages.models.iunet import IUNet2DModel
from diffusers_stages.routing import StageRouter, dispatch_by_stage
from diffusers_stages.schedulers import ContinuousVPDPMSolverSinglestepScheduler, sigma_to_timestep
from diffusers_stages.timestep_sampling import stage_counts, stratified_timesteps
from diffusers_stages.training import diffusion_loss
from tests.conftest import TINY_COND_UNET, TINY_UNET
from tests.fake_cuda import CUDA as CUDA_DEVICE
from tests.fake_cuda import DeviceMismatch, StreamRace, fake_cuda
from tests.pipelines.conftest import KINDS, tiny_pipeline


def cuda_randn(*shape):
    return torch.randn(*shape, device="cuda")


def cuda_tensor(values):
    return torch.tensor(values, device="cuda")


def small_unet(width: int = 8) -> UNet2DModel:
    return UNet2DModel(
        sample_size=8, block_out_channels=(width, width), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    ).eval()  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the stand-in itself: what fails on a GPU fails here, what works there works here
def test_the_stand_in_refuses_what_cuda_refuses():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with fake_cuda():
        conv.to("cuda")
        x = cuda_randn(2, 3, 4, 4)
        y = conv(x)
        assert y.device != torch.device("cpu") and y.device == x.device
        with pytest.raises(DeviceMismatch):
            conv(torch.randn(2, 3, 4, 4))
        with pytest.raises(DeviceMismatch):
            y + torch.ones(4, 1, 1)
        with pytest.raises(DeviceMismatch):
            torch.bucketize(y, torch.tensor([0.0, 1.0]))
        with pytest.raises(DeviceMismatch):
            torch.randn(2, generator=torch.Generator().manual_seed(0), device="cuda")
        with pytest.raises(TypeError, match="numpy"):
            y.numpy()
        # what CUDA allows: scalars, CPU indices, host reads, copies, diffusers' CPU-generator draws
        assert (y * torch.tensor(2.0)).device == y.device and y[torch.tensor([1, 0])].device == y.device
        out = torch.empty_like(y)
        out[torch.tensor([1, 0])] = y
        assert torch.equal(out.cpu()[0], y.cpu()[1]) and y.cpu().numpy().shape == (2, 4, 4, 4)
        assert isinstance(y.sum().item(), float) and len(y.tolist()) == 2
        noise = diffusers.utils.torch_utils.randn_tensor(
            (2,), generator=torch.Generator().manual_seed(0), device=x.device
        )
        assert noise.device == x.device


def test_the_stand_in_streams_refuse_a_read_before_the_copy_is_done():
    weight = torch.randn(4, 4)
    with fake_cuda():
        side, current = torch.cuda.Stream(), torch.cuda.current_stream()
        x = cuda_randn(2, 4)
        current.wait_stream(side)  # a wait before the copy does not cover it
        with torch.cuda.stream(side):
            w = weight.to("cuda", non_blocking=True)
        assert torch.cuda.current_stream() is current
        with pytest.raises(StreamRace, match="no `wait_stream`"):
            x @ w
        current.wait_stream(side)
        with pytest.raises(StreamRace, match="no `record_stream`"):
            x @ w
        w.data.record_stream(current)  # `.data` is the same memory
        torch.testing.assert_close((x @ w).cpu(), x.cpu() @ weight)


def test_sigma_to_timestep_after_a_device_add_noise():
    # DDPMScheduler.add_noise moves alphas_cumprod onto the sample's device
    scheduler = DDPMScheduler()
    expected = sigma_to_timestep(scheduler, 1.0)
    with fake_cuda():
        x = cuda_randn(1, 3, 8, 8)
        scheduler.add_noise(x, x, cuda_tensor([5]))
        assert scheduler.alphas_cumprod.device == x.device
        assert sigma_to_timestep(scheduler, 1.0) == expected


# ---------------------------------------------------------------------------------------------------------------
# models: routed mixed batches, one-stage batches, forced stages, Python-number and CPU timesteps
def test_multistage_unet():
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(400, 700), num_class_embeds=4).eval()
    fused = MultiStageUNet2DModel.from_unet(UNet2DModel(**TINY_UNET), stage_boundaries=(300, 600)).eval()
    fused.enable_fused_decoders()
    with fake_cuda():
        model.to("cuda")
        fused.to("cuda")
        x, labels = cuda_randn(3, 3, 8, 8), cuda_tensor([0, 1, 2])
        for t in (cuda_tensor([10, 500, 900]), torch.tensor([10, 500, 900]), 500, cuda_tensor(500.0)):
            assert model(x, t, class_labels=labels).sample.device == x.device
        assert model(x, 500, class_labels=labels, stage_index=1).sample.device == x.device
        assert fused(cuda_randn(4, 3, 8, 8), cuda_tensor([10, 500, 900, 20])).sample.device == x.device


def test_multistage_condition_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_COND_UNET).eval()
    model = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=(300, 600)).eval()
    with fake_cuda():
        model.to("cuda")
        x, text = cuda_randn(3, 4, 8, 8), cuda_randn(3, 5, 32)
        assert model(x, cuda_tensor([100, 450, 900]), text).sample.device == x.device
        assert model(x, 700, text).sample.device == x.device


def test_ddpmpp_unet():
    torch.manual_seed(0)
    model = MultiStageDDPMppUNet2DModel(
        sample_size=8, encoder_channels=16, decoder_channels=(24, 16, 8), channel_mult=(1, 2), layers_per_block=1,
        attention_resolutions=(4,), dropout=0.0, num_class_embeds=3,
    ).eval()  # fmt: skip
    with fake_cuda():
        model.to("cuda")
        x, c_noise = cuda_randn(3, 3, 8, 8), cuda_tensor([0.5, 5.0, 40.0]).log() / 4
        assert model(x, c_noise, class_labels=cuda_tensor([0, 1, 2])).sample.device == x.device


def test_iunet_uvit_and_early_exit():
    torch.manual_seed(0)
    iunet = IUNet2DModel(
        sample_size=8, block_out_channels=(8, 16), attention_ratios=(0.5, 1.0), attention_head_dim=4,
        layers_per_block=1, norm_num_groups=4,
    ).eval()  # fmt: skip
    uvit = UViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2, num_class_embeds=3).eval()
    early = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2).eval()
    with fake_cuda():
        for model in (iunet, uvit, early):
            model.to("cuda")
        x = cuda_randn(2, 3, 8, 8)
        assert iunet(x, 500).sample.device == x.device
        assert iunet(x, cuda_tensor([1, 600])).sample.device == x.device
        assert uvit(x, 500, class_labels=cuda_tensor([0, 2])).sample.device == x.device
        for threshold in (1.0, 0.3, None):
            assert early(x, 500, exit_threshold=threshold).sample.device == x.device
        assert early_exit_loss(early, x, cuda_tensor([3, 700]), x).device == x.device


def test_expert_routing_model():
    torch.manual_seed(0)
    model = ExpertRoutingModel([small_unet(16), small_unet(8)], stage_boundaries=(500,)).eval()
    with fake_cuda():
        model.to("cuda")
        x = cuda_randn(3, 3, 8, 8)
        assert model(x, cuda_tensor([10, 700, 20])).sample.device == x.device
        assert model(x, 700).sample.device == x.device


# ---------------------------------------------------------------------------------------------------------------
# routing
def test_routing():
    partition = TimestepPartition([400, 700])
    with fake_cuda():
        t, x = cuda_tensor([900, 10, 500, 950]), cuda_randn(4, 3)
        out = dispatch_by_stage(partition, t, None, lambda stage, x: x * stage, x)
        assert torch.equal(out.cpu(), x.cpu() * torch.tensor([2.0, 0.0, 1.0, 2.0])[:, None])
        out = dispatch_by_stage(partition, t, None, lambda stage, x: x * stage, x, fuse=lambda c: lambda i: i * 2)
        assert out.device == x.device
        sigma = TimestepPartition([1.0, 10.0], units="sigma")
        c_noise = cuda_tensor([0.5, 20.0, 3.0]).log() / 4
        assert dispatch_by_stage(sigma, c_noise, None, lambda stage, x: x * stage, x[:3]).device == x.device
        scheduler = diffusers.HeunDiscreteScheduler()
        scheduler.set_timesteps(4, device="cuda")
        router = StageRouter(partition, scheduler)
        assert [router(t) for t in scheduler.timesteps][0] == 2


# ---------------------------------------------------------------------------------------------------------------
# sampling: a few steps of every pipeline kind, with CPU generators as users pass them
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "scheduler",
    [
        diffusers.DDIMScheduler,
        diffusers.DDPMScheduler,
        diffusers.HeunDiscreteScheduler,
        diffusers.DPMSolverMultistepScheduler,
        diffusers.EDMEulerScheduler,
        ContinuousVPDPMSolverSinglestepScheduler,
    ],
)
def test_pipelines(kind, scheduler):
    pipe = tiny_pipeline(kind, scheduler(), num_class_embeds=4)
    with fake_cuda():
        pipe.to("cuda")
        images = pipe(
            class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images  # fmt: skip
        assert images.shape == (2, 3, 8, 8)
        pipe(
            class_labels=cuda_tensor([1]), num_images_per_prompt=2, num_inference_steps=2, output_type="np",
            generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
        )  # fmt: skip
        pipe(class_labels=[1, 2], latents=torch.randn(2, 3, 8, 8), num_inference_steps=2, output_type="pil")


def test_dual_backbone_sigma_switch():
    pipe = tiny_pipeline("dual_backbone", switch_sigma=1.0)
    with fake_cuda():
        pipe.to("cuda")
        assert pipe(batch_size=2, num_inference_steps=3, output_type="pt").images.shape == (2, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# training: timestep sampling (on the CPU, then moved, as the loop does) and the losses on the device
def test_timestep_sampling():
    generator = torch.Generator().manual_seed(0)
    with fake_cuda():
        timesteps, stages = stratified_timesteps(TimestepPartition([400, 700]), 8, None, generator=generator)
        assert sorted(stage_counts(8, [0.2, 0.3, 0.5], generator)) == [2, 2, 4]
        timesteps, stages = timesteps.to("cuda"), stages.to("cuda")
        assert TimestepPartition([400, 700]).stage_for_timestep(timesteps).device == timesteps.device


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss(prediction_type):
    torch.manual_seed(0)
    model, scheduler = small_unet(), DDPMScheduler(prediction_type=prediction_type)
    with fake_cuda():
        model.to("cuda")
        clean, t = cuda_randn(2, 3, 8, 8), cuda_tensor([3, 700])
        assert diffusion_loss(model, scheduler, clean, t, noise=cuda_randn(2, 3, 8, 8)).device == clean.device
        assert diffusion_loss(model, scheduler, clean, t, snr_gamma=5.0).device == clean.device
        assert diffusion_loss(model, scheduler, clean, torch.tensor([3, 700])).device == clean.device
        edm = diffusion_loss(model, EDMEulerScheduler(), clean, cuda_tensor([0.5, 20.0]))
        assert edm.device == clean.device


def test_diffusion_loss_draws_the_noise_with_a_cpu_generator():
    # the generator users pass (the training loop's is a CPU one); the noise is the one it draws on the CPU
    torch.manual_seed(0)
    model, scheduler, clean = small_unet(), DDPMScheduler(), torch.randn(2, 3, 8, 8)
    expected = diffusion_loss(model, scheduler, clean, torch.tensor([3, 700]), generator=torch.manual_seed(1))
    with fake_cuda():
        model.to("cuda")
        loss = diffusion_loss(
            model, scheduler, clean.to("cuda"), cuda_tensor([3, 700]), generator=torch.Generator().manual_seed(1)
        )
        assert torch.allclose(loss.cpu(), expected)


# ---------------------------------------------------------------------------------------------------------------
# more sampling: class labels as a cross-attention context, staged U-Nets in diffusers' Stable Diffusion pipeline,
# and the stage offload (its prefetch on a CUDA side stream on the stand-in streams)
def test_class_context_pipeline(tiny_cond_unet):
    from diffusers_stages import ClassContextEmbedding, MultiStagePipeline

    unet = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=(400, 700)).eval()
    embedder = ClassContextEmbedding(num_class_embeds=4, cross_attention_dim=32).eval()
    pipe = MultiStagePipeline(unet=unet, scheduler=diffusers.DDIMScheduler(), class_embedder=embedder)
    pipe.set_progress_bar_config(disable=True)
    with fake_cuda():
        pipe.to("cuda")
        images = pipe(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=2, output_type="pt").images
        assert images.shape == (2, 4, 8, 8)


def test_class_context_is_not_moved_at_every_step_by_model_cpu_offload(tiny_cond_unet, monkeypatch):
    """`enable_model_cpu_offload` chained the class embedder before the U-Net (`class_embedder->unet->vae`), but the
    loop calls it at every step: each step moved it in, and the U-Net's hook out again (emptying the CUDA cache).
    As diffusers does for a component called at every step (a ControlNet), it is now offloaded on its own: on the
    device from its first call to the end of the run."""
    from accelerate.hooks import UserCpuOffloadHook

    from diffusers_stages import ClassContextEmbedding, MultiStagePipeline
    from diffusers_stages.pipelines import offload

    monkeypatch.setattr(offload, "check_device", lambda value, name: torch.device(value))  # "cuda": the stand-in
    unet = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=(400, 700)).eval()
    embedder = ClassContextEmbedding(num_class_embeds=4, cross_attention_dim=32).eval()
    pipe = MultiStagePipeline(unet=unet, scheduler=diffusers.DDIMScheduler(), class_embedder=embedder)
    pipe.set_progress_bar_config(disable=True)
    run = {"class_labels": [0, 2], "guidance_scale": 2.0, "num_inference_steps": 4, "output_type": "pt"}
    expected = pipe(generator=torch.Generator().manual_seed(0), **run).images
    offloaded = []
    move_out = UserCpuOffloadHook.offload
    monkeypatch.setattr(UserCpuOffloadHook, "offload", lambda hook: (offloaded.append(hook.model), move_out(hook)))
    with fake_cuda():
        pipe.enable_model_cpu_offload(device="cuda")
        images = pipe(generator=torch.Generator().manual_seed(0), **run).images
    torch.testing.assert_close(images.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert embedder not in offloaded


@pytest.mark.parametrize("kind", ["multistage", "experts"])
def test_staged_unets_in_stable_diffusion(tiny_sd_components, tiny_cond_unet, kind):
    pipe = diffusers.StableDiffusionPipeline(**dict(tiny_sd_components, scheduler=diffusers.HeunDiscreteScheduler()))
    if kind == "multistage":
        pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=(400, 700)).eval()
    else:
        pipe.unet = ExpertRoutingModel([tiny_cond_unet(0), tiny_cond_unet(1)], stage_boundaries=(500,)).eval()
    pipe.set_progress_bar_config(disable=True)
    with fake_cuda():
        pipe.to("cuda")
        images = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
        assert images.images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_stage_offload(kind, prefetch, monkeypatch):
    # with prefetch, the next network is copied on a side stream: each network's first call must wait for its copy
    from diffusers_stages.pipelines import offload

    monkeypatch.setattr(offload, "check_device", lambda value, name: torch.device(value))  # "cuda": the stand-in
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    pipe = tiny_pipeline(kind, num_class_embeds=4)
    run = {"class_labels": [0, 2], "guidance_scale": 2.0, "num_inference_steps": 3, "output_type": "pt"}
    expected = pipe(generator=torch.Generator().manual_seed(0), **run).images
    with fake_cuda():
        pipe.enable_stage_offload(device="cuda", prefetch=prefetch)
        for _ in range(2):  # a second run reuses the hooks
            images = pipe(generator=torch.Generator().manual_seed(0), **run).images
            torch.testing.assert_close(images.cpu(), expected, rtol=1e-4, atol=1e-4)
        for stage in range(pipe.resolve_partition(3).num_stages):  # every stage network back on the CPU after the run
            assert {p.device.type for p in pipe.stage_network(stage).parameters()} == {"cpu"}
        if prefetch:  # the stand-in streams catch a prefetched network used before its copy is done
            with monkeypatch.context() as patch, pytest.raises(StreamRace):
                patch.setattr(offload.StageOffload, "_wait", lambda self, unit: None)
                pipe(**run)
        pipe.disable_stage_offload()  # waits for a copy still pending


@pytest.mark.parametrize("kind", KINDS)
def test_a_stage_offloaded_run_stopped_by_an_exception(kind, monkeypatch):
    """A run stopped by an exception (a callback raising, Ctrl-C) right after a prefetch left that copy running and
    the networks on the device: saving or casting the pipeline then read weights still being copied."""
    from diffusers_stages.pipelines import offload

    monkeypatch.setattr(offload, "check_device", lambda value, name: torch.device(value))  # "cuda": the stand-in
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    pipe = tiny_pipeline(kind)

    def stop_after_a_prefetch(pipe, i, t, callback_kwargs):
        if pipe._stage_offload.pending:
            raise KeyboardInterrupt
        return {}

    with fake_cuda():
        pipe.enable_stage_offload(device="cuda")
        with pytest.raises(KeyboardInterrupt):
            pipe(num_inference_steps=4, callback_on_step_end=stop_after_a_prefetch, output_type="pt")
        networks = pipe._stage_offload.units
        assert all(tensor.cpu() is not None for network in networks for tensor in network.state_dict().values())
        assert not pipe._stage_offload.resident  # every stage network back on the offload device, as after a run
        pipe.disable_stage_offload()


# ---------------------------------------------------------------------------------------------------------------
# a model whose stage networks are on different devices (a `device_map` over several GPUs, or one offloaded to the
# CPU): accelerate's hooks run each network on its own device, the routing brings the outputs back together
def test_routing_joins_stage_outputs_from_different_devices():
    partition = TimestepPartition([400, 700])

    def run(stage, x):  # stage 1's network on the CPU, the others on the device
        return x.cpu() * stage if stage == 1 else x * stage

    with fake_cuda():
        t, x = cuda_tensor([900, 10, 500, 950]), cuda_randn(4, 3)
        for timesteps in (t, cuda_tensor([500, 600, 450, 401])):
            out = dispatch_by_stage(partition, timesteps, None, run, x)
            stages = partition.stage_for_timestep(timesteps).cpu()
            assert out.device == x.device and torch.equal(out.cpu(), x.cpu() * stages[:, None])


def test_multistage_unet_with_a_decoder_on_another_device():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(400, 700)).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        expected = model(x, t).sample
    with fake_cuda():
        model.to("cuda")
        model.decoders[0].to("cpu")
        add_hook_to_module(model.decoders[0], AlignDevicesHook(execution_device=torch.device("cpu")))
        out = model(x.to("cuda"), t.to("cuda")).sample
        assert out.device == CUDA_DEVICE and torch.allclose(out.cpu(), expected, atol=1e-6)
        assert model(x.to("cuda"), cuda_tensor([10, 20, 30])).sample.device == CUDA_DEVICE


def test_expert_routing_model_takes_timesteps_from_the_cpu():
    # as the multi-stage U-Nets do: one timestep per sample given on the CPU, the samples on the device
    torch.manual_seed(0)
    model = ExpertRoutingModel([small_unet(16), small_unet(8)], stage_boundaries=(500,)).eval()
    x = torch.randn(3, 3, 8, 8)
    for t in (torch.tensor([10, 700, 20]), torch.tensor([10, 20, 30]), torch.tensor([700]), torch.tensor(700)):
        with torch.no_grad():
            expected = model.to("cpu")(x, t).sample
        with fake_cuda():
            out = model.to("cuda")(x.to("cuda"), t).sample
            assert out.device == CUDA_DEVICE and torch.allclose(out.cpu(), expected, atol=1e-6)


def test_warm_start_from_a_unet_on_the_device(tiny_cond_unet):
    torch.manual_seed(0)
    unet, cond = UNet2DModel(**TINY_UNET).eval(), tiny_cond_unet(0)
    with fake_cuda():
        unet.to(device=torch.device("cuda"))  # as `module.to(device=...)` is called too
        cond.to("cuda")
        model = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300, 600))
        cond_model = MultiStageUNet2DConditionModel.from_unet(cond, stage_boundaries=(300, 600))
        t = cuda_tensor([10, 500, 900])
        assert model(cuda_randn(3, 3, 8, 8), t).sample.device == CUDA_DEVICE
        assert cond_model(cuda_randn(3, 4, 8, 8), t, cuda_randn(3, 5, 32)).sample.device == CUDA_DEVICE
