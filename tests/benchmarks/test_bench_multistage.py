"""`benchmarks/bench_multistage.py`: the routing-overhead and pipeline sections run on a tiny U-Net and report the
method's time and the null control's next to the baseline's."""

import argparse
import os
import sys

import pytest
import torch
from diffusers import UNet2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import bench_multistage as bench  # noqa: E402
from tests.conftest import TINY_UNET  # noqa: E402


def test_overhead_and_pipeline_sections_report_the_method_and_the_null_control():
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET).eval()
    args = argparse.Namespace(device="cpu", resolution=8, repeats=1, steps=2, decoder_counts=[2])
    rows = bench.routing_overhead(args, unet) + bench.pipeline_overhead(args, unet)
    names = [name for name, *_ in rows]
    assert names == [
        "forward, batch 1, 2 identical decoders, routed from timestep (CPU time)",
        "forward, batch 1, 2 identical decoders, stage_index given (CPU time)",
        "forward, batch 1, 2 identical decoders: null control, a copy of the U-Net (CPU time)",
        "forward, batch 16, 2 identical decoders, routed from timestep (CPU time)",
        "forward, batch 16, 2 identical decoders, stage_index given (CPU time)",
        "forward, batch 16, 2 identical decoders: null control, a copy of the U-Net (CPU time)",
        "pipeline time per step (small model, batch 1, CPU time)",
        "pipeline time per step (small model, batch 1, CPU time): null control, DDIMPipeline over a copy",
    ]
    assert all(base > 0 and method > 0 for _, base, method, _ in rows)


def test_the_mixed_batch_case_times_the_fused_pass_with_and_without_the_stacked_layout():
    torch.manual_seed(0)
    models, fns, counts = bench.mixed_case(UNet2DModel(**TINY_UNET), 4, 8, "cpu", copied_stack=True)
    paths = fns()
    assert list(paths) == ["single", "per_stage", "fused", "fused, stack copied"] and counts == [2, 2, 2, 2]
    fused, copied = models[1], models[2]
    first, second = (decoder.conv_out.weight for decoder in fused.decoders[:2])
    assert second.data_ptr() - first.data_ptr() == first.numel() * first.element_size()  # laid out as one stack
    weight = copied.decoders[0].conv_out.weight
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()  # storage of its own
    with torch.no_grad():
        outputs = {path: fn().sample for path, fn in paths.items() if path != "single"}
    assert all(torch.allclose(out, outputs["per_stage"], atol=1e-5) for out in outputs.values())
    rows = bench.mixed_rows("mixed", paths, 1, "cpu")
    assert [name for name, *_ in rows][:3] == [
        "mixed: per_stage vs one stage",
        "mixed: fused vs one stage",
        "mixed: fused, stack copied vs one stage",
    ]


def test_each_section_prints_its_rows_when_it_ends(monkeypatch, capsys):
    # a run stopped during a later section (a time limit, an error) keeps the rows measured before it
    monkeypatch.setattr(bench, "routing_overhead", lambda args, baseline: [("overhead row", 1.0, 2.0, "ms")])

    def cut(args, small):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "mixed_batches", cut)
    args = bench.parse_args(
        ["--device", "cpu", "--sections", "overhead", "mixed", "--width", "8", "--resolution", "8"]
    )
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    assert "| overhead row | 1.000 ms | 2.000 ms | 2.000 |" in capsys.readouterr().out


def test_the_load_section_imports_the_installed_package_from_any_working_directory(monkeypatch, tmp_path):
    # its subprocess (`python -c`) must not import a `diffusers_stages` folder in the working directory (the
    # checkout's root, where the scripts are run, holds one without pipelines/)
    (tmp_path / "diffusers_stages").mkdir()
    (tmp_path / "diffusers_stages" / "__init__.py").write_text("raise ImportError('the working directory')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "UNet2DModel", lambda **kwargs: UNet2DModel(**TINY_UNET))  # not ~0.3 GB
    ((name, params, peak, unit),) = bench.load_peak(None)
    assert params > 0 and unit == "MiB"


@pytest.mark.parametrize(("option", "value"), [("--width", "12"), ("--resolution", "6")])
def test_a_width_or_resolution_the_u_net_cannot_take_is_refused_up_front(option, value, capsys):
    # before: the run built the models first and then stopped in a traceback (a group norm of 12 channels in 8
    # groups, a skip of 3x3 against an up-sampled 4x4)
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", option, value])
    err = capsys.readouterr().err
    assert f"{option} must be a multiple of" in err and f"got {value}" in err


@pytest.mark.parametrize("width", [8, 32, 64])
def test_the_tailored_decoders_fit_every_width_the_options_take(width):
    # before: at --width 32 (README's small model) the clean-end decoder was 4 channels wide, which 8 norm groups
    # cannot split, and sections flops and sampling stopped in a traceback
    kwargs = bench.encoder_kwargs(width, 8)
    model = bench.MultiStageUNet2DModel(**kwargs, decoder_block_out_channels=bench.tailored_widths(width))
    assert model.num_stages == 3


@pytest.mark.parametrize(("threads", "expected"), [(["--threads", "2"], 2), ([], 1)])
def test_the_mixed_section_runs_on_the_threads_asked_for(threads, expected, monkeypatch):
    # before: it always set one thread, while the run's header printed the --threads given ("device cpu (2 threads)")
    # over rows timed on one; without --threads it keeps its single thread (the README's tables)
    seen = []
    monkeypatch.setattr(bench, "MIXED_CASES", ((2, 4),))
    monkeypatch.setattr(bench, "mixed_rows", lambda *args: seen.append(torch.get_num_threads()) or [])
    monkeypatch.setattr(bench, "encoder_kwargs", lambda width, resolution: TINY_UNET)  # the wide model: tiny here
    args = bench.parse_args(["--device", "cpu", "--sections", "mixed", "--width", "8", "--resolution", "8", *threads])
    before = torch.get_num_threads()
    try:
        bench.mixed_batches(args, UNet2DModel(**TINY_UNET).eval())
        assert seen == [expected, expected] and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
