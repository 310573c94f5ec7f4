"""Smoke tests of the evidence benchmark's pieces (seconds): data, metric, FLOP accounting, training, sampling, report.
The benchmark itself is `python benchmarks/run_evidence.py --quick`."""

import os
import sys

import matplotlib.pyplot
import pytest
import torch
from diffusers import UNet2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.evidence.data import load_images
from benchmarks.evidence.flops import count_flops, sampling_flops_per_image
from benchmarks.evidence.metric import Evaluator, FeatureClassifier, train_classifier
from benchmarks.evidence.presets import get_preset
from benchmarks.evidence.report import quality_plots, verdicts, write_markdown, write_plots
from benchmarks.evidence.sampling import generate, seconds_per_image, single_model_pipeline
from benchmarks.evidence.training import train_with_budget, uniform_timesteps


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        num_class_embeds=11,
    )


def _report_header() -> dict:
    """A results header as `run_evidence.py` writes one (quick preset), for the report tests."""
    return {
        "preset": get_preset("quick").to_dict(),
        "command": "cmd",
        "date": "now",
        "machine": "cpu",
        "wall_minutes": 1.0,
        "reference": {"fd": 5.0, "accuracy": 0.9},
        "budget_flops": 1e12,
    }


def test_digits_split_is_seeded_and_disjoint():
    train, train_labels = load_images("digits", "train")
    test, _ = load_images("digits", "test")
    assert train.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797 and len(train) == len(train_labels)
    assert torch.equal(load_images("digits", "train")[0], train)
    assert train.min() == -1 and train.max() == 1
    with pytest.raises(ValueError, match="split"):
        load_images("digits", "valid")
    with pytest.raises(ValueError, match="name"):
        load_images("cifar", "train")


def test_classifier_is_cached_and_metric_orders_quality(tmp_path):
    net = train_classifier("digits", str(tmp_path), max_steps=30)
    assert len(os.listdir(tmp_path)) == 1
    again = train_classifier("digits", str(tmp_path), max_steps=30)  # loaded from the cache
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    train, _ = load_images("digits", "train")
    test, test_labels = load_images("digits", "test")
    evaluator = Evaluator(net, train)
    real = evaluator.score(test, test_labels)
    noisy = evaluator.score(test + 0.5 * torch.randn_like(test, generator=None), test_labels)
    noise = evaluator.score(torch.rand_like(test) * 2 - 1)
    assert real["fd"] < noisy["fd"] < noise["fd"] and "accuracy" not in noise
    assert 0.0 <= real["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="images"):
        evaluator.score(test[:1])


def test_feature_classifier_rejects_sizes():
    with pytest.raises(ValueError, match="image_size"):
        FeatureClassifier(image_size=28)


def test_training_stops_at_the_flop_budget():
    model = tiny_unet()
    images, labels = load_images("digits", "train")
    x = images[:4]

    def step():
        model(x, torch.zeros(4, dtype=torch.long), class_labels=labels[:4]).sample.pow(2).mean().backward()

    per_step, _ = count_flops(step)
    assert per_step > 0
    snapshots = train_with_budget(
        model,
        images,
        labels,
        3 * per_step,
        uniform_timesteps(),
        batch_size=4,
        learning_rate=1e-3,
        seed=0,
        snapshot_fractions=(0.5, 1.0),
        count_every=2,
    )
    assert [s.fraction for s in snapshots] == [0.5, 1.0]
    assert [s.steps for s in snapshots] == [2, 3]
    assert snapshots[-1].flops == pytest.approx(3 * per_step, rel=0.01)
    assert not torch.equal(snapshots[0].state_dict["conv_in.weight"], snapshots[1].state_dict["conv_in.weight"])
    with pytest.raises(ValueError, match="budget_flops"):
        train_with_budget(model, images, labels, 0, uniform_timesteps(), 4, 1e-3, 0)


def test_sampling_is_seeded_and_counted():
    pipe = single_model_pipeline(tiny_unet())
    images, labels = generate(pipe, 6, num_inference_steps=2, seed=0, batch_size=4)
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(images, generate(pipe, 6, num_inference_steps=2, seed=0, batch_size=4)[0])
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    forward, _ = count_flops(lambda: pipe.experts(torch.zeros(1, 1, 8, 8), 10, class_labels=torch.tensor([0])))
    assert sampling_flops_per_image(pipe, 3, class_labels=[0]) == 3 * forward
    seconds = seconds_per_image({"a": pipe}, num_inference_steps=1, batch_size=2, repeats=2)["a"]
    assert len(seconds) == 2 and min(seconds) > 0  # each repeat's, for their spread


def row(comparison, method, fraction, fd, seconds=None, gflops=None):
    return {
        "comparison": comparison,
        "method": method,
        "train_flops": fraction * 1e12,
        "budget_fraction": fraction,
        "fd": fd,
        "accuracy": 0.5,
        "params": 1000,
        "seconds_per_image": seconds,
        "sampling_gflops_per_image": gflops,
        "notes": "",
    }


def test_verdicts_and_report(tmp_path):
    rows = [row("1", "UNet2DModel", f, fd) for f, fd in [(0.5, 30.0), (1.0, 20.0)]]
    rows += [row("1", "MultiStageUNet2DModel", f, fd) for f, fd in [(0.5, 19.0), (1.0, 15.0)]]
    rows += [
        row("3", "UNet2DModel", 1.0, 20.0, 0.010, 1.0),
        row("3", "DuoDiff switch 0.5", 1.0, 20.5, 0.005, 0.5),
        row("3", "DuoDiff switch 0.75", 1.0, 40.0, 0.004, 0.3),
        row("3", "early exit, full depth", 1.0, 25.0, 0.008, 0.8),
        row("3", "early exit, threshold 0.5", 1.0, 30.0, 0.004, 0.4),
    ]
    read = verdicts(rows, spread=1.0)
    assert "at 50% of B" in read["1"][1] and "holds" in read["1"][1]
    assert "2.00x the sampling speed of UNet2DModel" in read["3"][0] and ": holds" in read["3"][0]
    assert "does not hold" in read["3"][1]
    assert "2.00x the sampling speed of early exit, full depth" in read["3"][2] and "worse" in read["3"][2]
    assert "mixed: better quality, slower" in read["3"][3]
    header = _report_header()
    write_markdown(str(tmp_path / "RESULTS.md"), header, rows, 1.0)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "not FID" in text and "| MultiStageUNet2DModel | 0.500 | 50% | 19.00 |" in text and "Not run." in text
    for path in write_plots(str(tmp_path), rows, 5.0, spread=1.0):
        assert os.path.getsize(path) > 1000


def test_plots_distinct_markers_seed_band_linear_axes():
    rows = [row("1", "UNet2DModel", f, fd) for f, fd in [(0.5, 30.0), (1.0, 20.0)]]
    rows += [row("1", "MultiStageUNet2DModel", f, fd) for f, fd in [(0.5, 19.0), (1.0, 15.0)]]
    rows += [row("3", "UNet2DModel", 1.0, 20.0, 0.010, 1.0), row("3", "DuoDiff switch 0.5", 1.0, 20.5, 0.005, 0.5)]
    rows += [row("3", "early exit, full depth", 1.0, 25.0, 0.008, 0.8)]
    figures = quality_plots(rows, reference_fd=5.0, spread=2.0)
    for fig in figures.values():
        ax = fig.axes[0]
        assert ax.get_xscale() == ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    flops = figures["quality_vs_train_flops.png"].axes[0]
    markers = [
        line.get_marker() for line in flops.get_lines() if line.get_label() in ("UNet2DModel", "MultiStageUNet2DModel")
    ]
    assert len(set(markers)) == 2
    # the seed band: FD +- 2 around each multi-snapshot series
    band = flops.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 18.0 and band.max() == 32.0
    timing = figures["quality_vs_sampling_time.png"].axes[0]
    assert len({c.lines[0].get_marker() for c in timing.containers}) == 3  # one per method, with error bars
    for fig in figures.values():
        matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("name", ["data", "metric", "flops"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"benchmarks.evidence.{name}")
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def stand_in_comparisons(monkeypatch):
    """`run_evidence` with its comparisons stood in for (a baseline row, comparison 1 adding none): a run takes a
    second."""
    from types import SimpleNamespace

    from benchmarks import run_evidence
    from benchmarks.evidence.comparisons import Result

    def baseline(ctx):
        return [Result("1", "UNet2DModel", 1e12, 1.0, 20.0, 0.5, 1000, 0.01, 1.0, "")]

    fake = SimpleNamespace(
        Context=lambda preset, device, cache_dir: SimpleNamespace(
            device=device, reference={"fd": 5.0, "accuracy": 0.9}, budget=1e12, fd_seed_spread=1.0
        ),
        train_baseline=baseline,
        compare_multistage=lambda ctx, base: [],
    )
    monkeypatch.setattr(run_evidence, "C", fake)
    return run_evidence


def test_run_writes_to_a_temporary_folder_by_default(tmp_path, monkeypatch):
    """Without --output_dir the benchmark writes into a new temporary folder, never into the checkout (the
    comparisons themselves are stood in for: this checks where the outputs go, in a second)."""
    import tempfile

    run_evidence = stand_in_comparisons(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp creates its folder
    args = run_evidence.parse_args(["--quick", "--comparisons", "1"])
    assert args.output_dir is None
    run_evidence.run(args)
    (made,) = os.listdir(tmp_path)
    assert made.startswith("diffusers-stages-evidence-") and args.output_dir == str(tmp_path / made)
    assert {"RESULTS.md", "results.json", "quality_vs_train_flops.png"} <= set(os.listdir(tmp_path / made / "quick"))


def test_an_interrupted_save_keeps_the_results_saved_before(tmp_path, monkeypatch):
    """results.json is rewritten after every comparison: a run stopped while writing it (a time limit, Ctrl-C) must
    leave the results saved before whole, not a truncated file that `--report_only` cannot read."""
    import json

    run_evidence = stand_in_comparisons(monkeypatch)
    args = ["--quick", "--comparisons", "1", "--output_dir", str(tmp_path)]
    run_evidence.run(run_evidence.parse_args(args))
    folder = tmp_path / "quick"
    saved = {name: (folder / name).read_bytes() for name in ("results.json", "RESULTS.md")}

    def interrupted_dump(value, f, **kwargs):
        f.write('{"header": {"comm')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        run_evidence.run(run_evidence.parse_args(args))
    plots = ["quality_vs_sampling_time.png", "quality_vs_train_flops.png"]
    assert sorted(os.listdir(folder)) == sorted(["RESULTS.md", "results.json", *plots])  # no partial file left
    assert {name: (folder / name).read_bytes() for name in saved} == saved


def test_the_results_header_names_the_device_the_run_used(monkeypatch):
    # a `--device cpu` run on a machine with a GPU was reported as run on that GPU (and `cuda:1` as on device 0)
    from benchmarks import run_evidence

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {torch.device(device).index}")
    assert "GPU" not in run_evidence.machine(torch.device("cpu")) and "CPU" in run_evidence.machine(
        torch.device("cpu")
    )
    assert "GPU 1" in run_evidence.machine(torch.device("cuda:1"))


def test_running_some_comparisons_again_keeps_the_others_saved_with_the_same_settings(tmp_path, monkeypatch):
    """A run stopped during comparison 3 is finished with `--comparisons 3` into the same folder: that must not
    erase comparisons 1 and 2 from results.json (it did: the file held only what the new run measured); rows
    saved with other settings are not mixed in."""
    import json

    from benchmarks.evidence.comparisons import Result

    run_evidence = stand_in_comparisons(monkeypatch)
    fd = {"2": 30.0}
    run_evidence.C.compare_experts = lambda ctx, base: [Result("2", "MEME 4 experts", 1e12, 1.0, fd["2"], 0.5, 10)]
    folder = ["--quick", "--output_dir", str(tmp_path)]

    def rows():
        with open(tmp_path / "quick" / "results.json", encoding="utf-8") as f:
            return [(r["comparison"], r["method"], r["fd"]) for r in json.load(f)["results"]]

    run_evidence.run(run_evidence.parse_args([*folder, "--comparisons", "1,2"]))
    fd["2"] = 25.0
    run_evidence.run(run_evidence.parse_args([*folder, "--comparisons", "2"]))
    assert rows() == [("1", "UNet2DModel", 20.0), ("2", "MEME 4 experts", 25.0)]
    assert "comparison 1 kept from" in (tmp_path / "quick" / "RESULTS.md").read_text()
    run_evidence.run(run_evidence.parse_args([*folder, "--comparisons", "2", "--budget_steps", "7"]))
    assert rows() == [("2", "MEME 4 experts", 25.0)]  # another budget: the earlier rows are not comparable


def test_sampling_flops_per_image_are_counted_on_seeded_noise():
    # an early-exit model's FLOPs depend on the noise it denoises: counted on unseeded noise, they changed from run to
    # run (and differed between the methods' counts)
    def pipeline(batch_size, num_inference_steps, class_labels, generator, output_type):
        size = 1 + int(1000 * abs(float(torch.randn(1, generator=generator))))  # work that depends on the noise
        return torch.ones(size, 1) @ torch.ones(1, 1)

    assert sampling_flops_per_image(pipeline, 1) == sampling_flops_per_image(pipeline, 1)


def test_the_classifier_trains_on_the_seeds_split_and_its_cache_is_keyed_on_the_data(tmp_path, monkeypatch):
    import benchmarks.evidence.metric as metric

    seen = []
    monkeypatch.setattr(
        metric, "train_on_images", lambda images, labels, **kw: seen.append((images, kw["cache_path"]))
    )
    train_classifier("digits", str(tmp_path), seed=1)
    # the split the benchmark trains and scores on for this seed (its test images are held out from the classifier)
    assert torch.equal(seen[0][0], load_images("digits", "train", seed=1)[0])
    images, labels = load_images("digits", "train")
    monkeypatch.setattr(metric, "load_images", lambda name, split, seed=0: (images.flip(0), labels.flip(0)))
    train_classifier("digits", str(tmp_path))
    monkeypatch.setattr(metric, "load_images", lambda name, split, seed=0: (images, labels))
    train_classifier("digits", str(tmp_path))
    assert seen[1][1] != seen[2][1]  # other images (a changed data set file, another split): never the same cache


def test_sampling_flops_per_image_are_the_mean_over_the_timed_batch():
    # an early-exit model's images cost different FLOPs: one image's count is not the per-image cost of the batch
    # whose wall time is reported beside it
    def pipeline(batch_size, num_inference_steps, class_labels, generator, output_type):
        assert batch_size == len(class_labels)
        for label in class_labels:  # 2 * (label + 1) FLOPs for each image
            torch.ones(1, 1) @ torch.ones(1, label + 1)

    assert sampling_flops_per_image(pipeline, 1, class_labels=[0, 1, 2, 3]) == 2 * (1 + 2 + 3 + 4) / 4


def test_the_real_image_floor_is_scored_at_the_methods_sample_count():
    # the Frechet distance falls with the sample count (about 1 / count): a floor scored on fewer images than the
    # generated sets reads higher than a perfect generator's would
    from benchmarks.evidence.metric import real_image_floor

    torch.manual_seed(0)
    net = FeatureClassifier(8, width=8).eval().requires_grad_(False)
    reference = torch.rand(400, 1, 8, 8) * 2 - 1
    held_out, labels = torch.rand(300, 1, 8, 8) * 2 - 1, torch.arange(300) % 7  # classes 7-9 absent: imbalanced
    evaluator = Evaluator(net, reference)
    floor = real_image_floor(evaluator, held_out, labels, 100)  # enough: as many images as the generated sets
    assert floor["count"] == 100 and floor["held_out"] == 300
    # classes in turn (as the generated labels 0, 1, ..., 9, 0, ...), each class's images in the data's order
    balanced = torch.cat([torch.nonzero(labels == k)[: 15 if k < 2 else 14, 0] for k in range(7)])
    assert floor["fd"] == pytest.approx(evaluator.score(held_out[balanced])["fd"], rel=1e-5)
    floor = real_image_floor(evaluator, held_out, labels, 1000)  # too few: extrapolated in 1 / count to 1000
    whole = evaluator.score(held_out, labels)
    assert floor["count"] == 1000 and floor["held_out"] == 300 and floor["extrapolated"]
    assert floor["fd"] < whole["fd"] and floor["accuracy"] == whole["accuracy"]
    # the report says how the floor was had (and only what an older results.json recorded)
    from benchmarks.evidence.report import _floor_images

    assert "300 held-out real images (test split), extrapolated in 1 / count to 1000" in _floor_images(floor)
    assert _floor_images({"fd": 6.4, "accuracy": 0.9, "count": 360}) == "360 held-out real images (test split)"


def test_rows_measured_by_other_code_or_on_another_machine_are_not_kept(tmp_path, monkeypatch):
    """The rows kept from an earlier run must have been measured by the same code on the same machine (timings of a
    GPU run beside a CPU run's, or FLOPs counted before a counting fix, are not comparable); the results header
    records the code's versions for the same reason."""
    import json

    from benchmarks.evidence.comparisons import Result

    run_evidence = stand_in_comparisons(monkeypatch)
    run_evidence.C.compare_experts = lambda ctx, base: [Result("2", "MEME 4 experts", 1e12, 1.0, 30.0, 0.5, 10)]
    folder = ["--quick", "--output_dir", str(tmp_path)]

    def saved():
        with open(tmp_path / "quick" / "results.json", encoding="utf-8") as f:
            return json.load(f)

    run_evidence.run(run_evidence.parse_args([*folder, "--comparisons", "1,2"]))
    versions = saved()["header"]["versions"]
    assert {"diffusers_stages", "diffusers", "torch", "torchmetrics"} <= set(versions)
    monkeypatch.setattr(run_evidence, "versions", lambda: {**versions, "diffusers_stages": "another commit"})
    run_evidence.run(run_evidence.parse_args([*folder, "--comparisons", "2"]))
    assert [r["comparison"] for r in saved()["results"]] == ["2"]
    run_evidence.run(run_evidence.parse_args([*folder, "--comparisons", "1,2"]))
    monkeypatch.setattr(run_evidence, "machine", lambda device: "another machine")
    run_evidence.run(run_evidence.parse_args([*folder, "--comparisons", "2"]))
    assert [r["comparison"] for r in saved()["results"]] == ["2"]


def test_each_timing_group_records_every_methods_repeats_and_the_report_names_the_unreliable(tmp_path, monkeypatch):
    """A job on the shared machine slowed 2 of the multi-stage model's 3 timing repeats (120.3 ms/image where the idle
    machine gives 32.2) and nothing in the report showed it: every row now keeps its repeats (in results.json), and
    the report names each method whose repeats spread by more than 1.25x (max / min), with the comparison to rerun.
    Results saved before (no repeats) render as before."""
    import json
    from types import SimpleNamespace

    from benchmarks.evidence import comparisons
    from benchmarks.evidence.comparisons import Context, Result, _timed
    from benchmarks.evidence.report import unreliable_timings

    repeats = {"UNet2DModel": [0.0276, 0.0253, 0.0260], "MultiStageUNet2DModel": [0.0322, 0.1203, 0.1250]}
    monkeypatch.setattr(comparisons, "seconds_per_image", lambda pipelines, *args: {n: repeats[n] for n in pipelines})
    monkeypatch.setattr(comparisons, "sampling_flops_per_image", lambda pipe, steps, labels: 2e9)
    ctx = SimpleNamespace(preset=get_preset("quick"), device=torch.device("cpu"), log=lambda line: None)
    timings = Context.timing(ctx, {name: torch.nn.Identity() for name in repeats})
    results = [Result("1", "UNet2DModel", 1e12, 1.0, 20.0, 0.5, 1000)]
    results += [Result("1", "MultiStageUNet2DModel", f * 1e12, f, 15.0, 0.5, 1000) for f in (0.5, 1.0)]
    rows = json.loads(json.dumps([r.to_dict() for r in _timed(results, timings)]))  # as saved in results.json
    assert [r["seconds_per_image"] for r in rows] == [0.0260, 0.1203, 0.1203]
    assert (
        rows[1]["seconds_per_image_repeats"] == [0.0322, 0.1203, 0.1250] and rows[1]["sampling_gflops_per_image"] == 2
    )

    header = _report_header()
    warning = unreliable_timings(rows)
    assert "MultiStageUNet2DModel (comparison 1): 32.20-125.00 ms/image (median 120.30)" in warning
    assert "UNet2DModel (comparison 1)" not in warning.replace("MultiStageUNet2DModel", "")  # 25.3-27.6: steady
    assert "`--comparisons 1`" in warning and "idle machine" in warning
    write_markdown(str(tmp_path / "RESULTS.md"), header, rows, 1.0)
    assert warning in (tmp_path / "RESULTS.md").read_text()
    steady = [{**r, "seconds_per_image_repeats": [0.026, 0.027, 0.028]} for r in rows]
    assert unreliable_timings(steady) == ""
    write_markdown(str(tmp_path / "RESULTS.md"), header, steady, 1.0)
    assert "within 1.25x" in (tmp_path / "RESULTS.md").read_text()
    old = [{k: v for k, v in r.items() if k != "seconds_per_image_repeats"} for r in rows]  # saved before
    assert unreliable_timings(old) == ""
    write_markdown(str(tmp_path / "RESULTS.md"), header, old, 1.0)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Timing stability" not in text and "(median" not in text and "within 1.25x" not in text


def test_the_run_ends_with_a_warning_naming_unreliable_timings(tmp_path, monkeypatch, capsys):
    from benchmarks.evidence.comparisons import Result

    run_evidence = stand_in_comparisons(monkeypatch)
    slowed = Result("1", "MultiStageUNet2DModel", 1e12, 1.0, 15.0, 0.5, 1000, 0.12, 1.0, "", [0.03, 0.12, 0.13])
    run_evidence.C.compare_multistage = lambda ctx, base: [slowed]
    run_evidence.run(run_evidence.parse_args(["--quick", "--comparisons", "1", "--output_dir", str(tmp_path)]))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        last.startswith("warning: ") and "MultiStageUNet2DModel (comparison 1)" in last and "--comparisons 1" in last
    )
