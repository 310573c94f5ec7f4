"""The training run's state: the loss log, the sample grids (chunks, layout, EMA weights, tracker logs)."""

import os

import pytest
import torch
from accelerate import Accelerator

from diffusers_stages.training.state import LossLog


def test_the_loss_log_reads_its_sums_in_one_copy_and_means_them_per_stage_and_network(host_reads):
    # reading each value on its own (`.item()`, `if tensor > 0` per stage) waited for an accelerator once per value
    log = LossLog(num_stages=3, names=["shallow", "deep"], device=torch.device("cpu"))
    log.add(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1]), torch.tensor([1.0, 3.0, 5.0]))
    accelerator = Accelerator(cpu=True)
    logs = {}
    assert host_reads(lambda: logs.update(log.reduce(accelerator))) == 0
    assert logs == pytest.approx({"loss": 3.0, "loss/stage_0": 2.0, "loss/stage_2": 5.0, "loss/shallow": 1.0,
                                  "loss/deep": 4.0})  # fmt: skip
    assert "loss/stage_1" not in logs  # no sample of stage 1 since the last log
    assert log.sums.abs().sum() == 0  # the sums start again
    assert log.reduce(accelerator)["loss"] == 0.0  # nothing since: no division by zero


def test_a_network_without_samples_since_the_last_log_logs_no_loss():
    # an expert that got no sample in a step (a batch smaller than the expert count, a zero `--stage_shares` entry)
    # was logged with a loss of 0.0, a dip to zero in its TensorBoard curve; a stage without samples logs nothing
    log = LossLog(num_stages=3, names=["expert_0", "expert_1", "expert_2"], device=torch.device("cpu"))
    log.add(torch.tensor([0, 2]), torch.tensor([0, 2]), torch.tensor([1.0, 3.0]))
    logs = log.reduce(Accelerator(cpu=True))
    assert logs == pytest.approx({"loss": 2.0, "loss/stage_0": 1.0, "loss/stage_2": 3.0, "loss/expert_0": 1.0,
                                  "loss/expert_2": 3.0})  # fmt: skip


def test_the_loss_log_keeps_no_float64_where_the_device_has_none(monkeypatch):
    # the sums were float64 on the training device, and each loss was cast to float64 there: Apple's MPS has none
    import diffusers_stages.training.state as state

    monkeypatch.setattr(state, "exact_float", lambda device: torch.float32)  # what `exact_float` gives on MPS
    log = LossLog(num_stages=2, names=["unet"], device=torch.device("cpu"))
    cast = []
    original = torch.Tensor.double
    monkeypatch.setattr(torch.Tensor, "double", lambda self, *a, **k: cast.append(self) or original(self, *a, **k))
    log.add(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1.0, 3.0], dtype=torch.bfloat16))
    assert log.sums.dtype == torch.float32 and not cast
    assert log.reduce(Accelerator(cpu=True)) == pytest.approx({"loss": 2.0, "loss/stage_0": 1.0, "loss/stage_1": 3.0})


def _grid_args(**kwargs):
    import argparse

    return argparse.Namespace(**{"num_sample_images": 7, "seed": 3, "num_inference_steps": 2, **kwargs})


def _recording(pipeline, calls: list):
    """``pipeline`` whose calls append their keyword arguments to ``calls``."""
    call = type(pipeline).__call__

    class Recording(type(pipeline)):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return call(self, *args, **kwargs)

    pipeline.__class__ = Recording
    return pipeline


@pytest.mark.parametrize("eval_batch_size", [1, 3, 7, 16])
def test_the_sample_grid_is_sampled_in_chunks_of_eval_batch_size_and_is_the_same_whatever_their_size(
    tiny_unet_kwargs, eval_batch_size
):
    # the grid sampled all `--num_sample_images` images in one pipeline call (and decoded them all at once): a
    # text-to-image run at 512 px needed GBs for it during training. `--eval_batch_size` splits it, and each image
    # has its own generator (`--seed` + its index), so the grid does not depend on the split
    import numpy as np
    from diffusers import DDIMScheduler

    from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel
    from diffusers_stages.training.state import sample_grid

    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=(500,), num_class_embeds=4).eval()
    reference = sample_grid(MultiStagePipeline(unet=unet, scheduler=DDIMScheduler()), _grid_args(eval_batch_size=7), 3)
    calls = []
    pipe = _recording(MultiStagePipeline(unet=unet, scheduler=DDIMScheduler()), calls)
    grid, images = sample_grid(pipe, _grid_args(eval_batch_size=eval_batch_size), 3)
    sizes = [min(eval_batch_size, 7 - start) for start in range(0, 7, eval_batch_size)]
    assert [call["batch_size"] for call in calls] == sizes
    # the class labels cycle over the classes, 0, 1, 2, 0, ..., each chunk with its own
    assert [label for call in calls for label in call["class_labels"]] == [0, 1, 2, 0, 1, 2, 0]
    # one generator per image, seeded with `--seed` + its index, whatever the chunk
    assert [[g.initial_seed() for g in call["generator"]] for call in calls] == [
        list(range(3 + start, 3 + start + size)) for start, size in zip(range(0, 7, eval_batch_size), sizes)
    ]
    # the same images: the same noise, up to the float rounding of batched kernels (1e-6 on CPU)
    assert images.shape == (7, 8, 8, 3) and np.allclose(images, reference[1], rtol=0, atol=1e-5)
    assert np.abs(np.asarray(grid, np.int16) - np.asarray(reference[0], np.int16)).max() <= 1
    # image i is what the pipeline gives for its own label and a generator seeded with `--seed` + i
    alone = MultiStagePipeline(unet=unet, scheduler=DDIMScheduler())(
        batch_size=1, class_labels=[2], generator=torch.Generator().manual_seed(3 + 5), num_inference_steps=2,
        output_type="np",
    ).images  # fmt: skip
    assert np.allclose(images[5], alone[0], rtol=0, atol=1e-5)


def test_the_sample_grid_splits_the_prompts_of_a_text_to_image_run_into_chunks():
    # a task's own inputs (text-to-image: one prompt per image) are split with the images
    import numpy as np
    from diffusers import DiffusionPipeline

    from diffusers_stages.training.state import sample_grid

    class Prompted:
        def __init__(self):
            self.calls = []

        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, prompt, generator, num_inference_steps, output_type):
            self.calls.append((list(prompt), [g.initial_seed() for g in generator]))
            images = np.stack([np.full((8, 8, 3), len(p) / 10, np.float32) for p in prompt])  # 0.1 x prompt length
            return type("Output", (), {"images": images})

        numpy_to_pil = staticmethod(DiffusionPipeline.numpy_to_pil)

    pipe = Prompted()
    prompts = ["a", "bb", "ccc", "a", "bb"]
    _, images = sample_grid(pipe, _grid_args(num_sample_images=5, eval_batch_size=2), 0, {"prompt": prompts})
    assert pipe.calls == [(["a", "bb"], [3, 4]), (["ccc", "a"], [5, 6]), (["bb"], [7])]
    assert images[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.1, 0.2])


class _Flat:
    """A pipeline that samples flat 8-pixel images, image ``i`` of grey level ``i + 1`` (out of 255)."""

    def __init__(self):
        self.drawn = 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, generator, num_inference_steps, output_type, batch_size=None, class_labels=None, prompt=None):
        import numpy as np

        batch_size = len(prompt) if prompt is not None else batch_size

        levels = [(self.drawn + k + 1) / 255 for k in range(batch_size)]
        self.drawn += batch_size
        return type("Output", (), {"images": np.stack([np.full((8, 8, 3), v, np.float32) for v in levels])})

    @staticmethod
    def numpy_to_pil(images):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.numpy_to_pil(images)


@pytest.mark.parametrize(
    ("count", "rows", "cols"),
    [
        (1, 1, 1), (2, 1, 2), (3, 1, 3), (4, 2, 2), (6, 2, 3), (10, 2, 5), (16, 4, 4), (21, 3, 7),  # exact layouts
        # a prime count (or one whose exact layout is more than 3 times as wide as tall) was one long row: 17 images
        # of 512 px made an 8704 x 512 strip. Now a near-square grid, its last cells left blank
        (5, 2, 3), (7, 3, 3), (13, 4, 4), (14, 4, 4), (17, 4, 5), (22, 5, 5),
    ],
)  # fmt: skip
def test_the_sample_grid_is_near_square_whatever_the_count(count, rows, cols):
    import numpy as np

    from diffusers_stages.training.state import GRID_TILE_SIZE, sample_grid

    grid, images = sample_grid(_Flat(), _grid_args(num_sample_images=count, eval_batch_size=16), 0)
    assert images.shape == (count, 8, 8, 3) and grid.size == (cols * GRID_TILE_SIZE, rows * GRID_TILE_SIZE)
    tiles = np.asarray(grid)[::GRID_TILE_SIZE, ::GRID_TILE_SIZE, 0].reshape(-1)  # one pixel per tile, row by row
    assert tiles.tolist() == [*range(1, count + 1), *[0] * (rows * cols - count)]  # in order, then blank (black)


def test_a_sample_grid_is_drawn_with_the_ema_weights_in_eval_mode_and_logged_whole(tiny_unet_kwargs, tmp_path):
    # the grid of a training step: the EMA weights swapped in and the networks in eval mode while it samples (as the
    # saved pipeline samples), both restored after; every image of every chunk goes to the tracker, at that step
    import argparse

    import numpy as np
    from diffusers import DDIMScheduler
    from diffusers.training_utils import EMAModel

    from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel
    from diffusers_stages.training.state import RunState, save_samples

    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=(500,)).train()
    ema = EMAModel(unet.parameters())
    with torch.no_grad():
        for p in ema.shadow_params:
            p.mul_(0.5)  # EMA weights other than the network's
    trained = [p.detach().clone() for p in unet.parameters()]
    seen = []

    class Task:
        def pipeline(self, networks, scheduler, vae=None):
            network = networks["unet"]
            seen.append(([p.detach().clone() for p in network.parameters()], network.training))
            return MultiStagePipeline(unet=network, scheduler=scheduler)

        def sample_inputs(self, count):
            return None

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    logged = []
    writer = accelerator.get_tracker("tensorboard").writer
    writer.add_images = lambda tag, images, step, dataformats: logged.append((tag, images, step, dataformats))
    args = argparse.Namespace(output_dir=str(tmp_path), logger="tensorboard", num_sample_images=5, eval_batch_size=2,
                              seed=0, num_inference_steps=2)  # fmt: skip
    state = RunState(
        accelerator=accelerator, args=args, task=Task(), names=["unet"], models=[unet], emas={"unet": ema},
        optimizer=None, lr_scheduler=None, noise_scheduler=None, sampling_scheduler=DDIMScheduler(), vae=None,
        weight_dtype=torch.float32, num_classes=0, max_train_steps=10,
    )  # fmt: skip
    path = save_samples(state, 3)
    assert path == str(tmp_path / "samples" / "step_000003.png") and os.path.isfile(path)
    ((weights, training),) = seen
    assert not training and all(torch.equal(w, e) for w, e in zip(weights, ema.shadow_params))
    assert unet.training and all(torch.equal(w, p) for w, p in zip(trained, unet.parameters()))  # restored
    ((tag, images, step, dataformats),) = logged
    assert (tag, step, dataformats) == ("samples", 3, "NHWC") and images.shape == (5, 8, 8, 3)
    assert isinstance(images, np.ndarray)
    accelerator.end_training()


@pytest.mark.parametrize(
    ("inputs", "num_classes", "class_names", "captions"),
    [
        # text-to-image: each image's prompt, as diffusers' train_text_to_image.py captions its validation images
        ({"prompt": ["a cat", "a dog", "a cat"]}, 0, [], ["0: a cat", "1: a dog", "2: a cat"]),
        (None, 2, ["bird", "fish"], ["0: bird", "1: fish", "2: bird"]),  # class-conditional: the class drawn
        (None, 2, [], ["0: class 0", "1: class 1", "2: class 0"]),  # classes without names
        (None, 0, [], [None, None, None]),  # unconditional: nothing to say
    ],
)
def test_sample_images_logged_to_wandb_are_captioned_with_their_prompt_or_class(
    monkeypatch, tmp_path, inputs, num_classes, class_names, captions
):
    # wandb showed the grid's images without a word: which prompt (or class) each was sampled for was not said
    import argparse
    import sys
    import types

    from diffusers_stages.training.state import RunState, save_samples

    logged = []
    wandb = types.ModuleType("wandb")
    wandb.Image = lambda data, caption=None: ("image", data.shape, caption)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    accelerator = Accelerator(cpu=True)
    tracker = types.SimpleNamespace(log=lambda values, step: logged.append((values, step)))
    monkeypatch.setattr(accelerator, "get_tracker", lambda name: tracker if name == "wandb" else None)

    class Task:
        def pipeline(self, networks, scheduler, vae=None):
            return _Flat()

        def sample_inputs(self, count):
            return inputs

    task = Task()
    task.class_names = class_names
    args = argparse.Namespace(output_dir=str(tmp_path), logger="wandb", num_sample_images=3, eval_batch_size=2,
                              seed=0, num_inference_steps=2)  # fmt: skip
    state = RunState(
        accelerator=accelerator, args=args, task=task, names=[], models=[], emas={}, optimizer=None,
        lr_scheduler=None, noise_scheduler=None, sampling_scheduler=None, vae=None, weight_dtype=torch.float32,
        num_classes=num_classes, max_train_steps=10,
    )  # fmt: skip
    save_samples(state, 4)
    ((values, step),) = logged
    assert step == 4 and values == {"samples": [("image", (8, 8, 3), caption) for caption in captions]}
