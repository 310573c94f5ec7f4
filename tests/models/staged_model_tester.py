"""The tests every staged model passes (diffusers-style tester mixin).

A test class sets ``model_class``, implements ``get_init_kwargs()`` (a tiny configuration) and the class attributes
below; the shared tests then check routing, compilation, saving and loading (dtypes, variants, ``device_map``),
gradient checkpointing, attention processors and configuration errors. The ``assert_*`` helpers are also called
directly for other configurations of the same model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from diffusers import AutoModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0


def stage_batch_sizes(model, stage_modules: str) -> dict[int, list[int]]:
    """Record the batch size each stage's network (decoder, expert) is called with."""
    calls = {s: [] for s in range(model.num_stages)}
    for s, module in enumerate(getattr(model, stage_modules)):
        module.register_forward_hook(lambda mod, args, out, s=s: calls[s].append(args[0].shape[0]))
    return calls


def assert_mixed_batch_matches_reference(
    model, x: torch.Tensor, t: torch.Tensor, counts: Sequence[int], stage_modules: str
) -> torch.Tensor:
    """A mixed batch runs each stage's network once, on its own samples only, and equals per-sample calls."""
    calls = stage_batch_sizes(model, stage_modules)
    with torch.no_grad():
        mixed = model(x, t).sample
    assert calls == {s: [n] if n else [] for s, n in enumerate(counts)}  # cost: shared(B) + sum_s stage_s(B_s)
    with torch.no_grad():
        reference = torch.cat([model(x[i : i + 1], t[i : i + 1]).sample for i in range(x.shape[0])])
    assert mixed.shape == x.shape and torch.allclose(mixed, reference, atol=1e-5)
    return mixed


class GraphCounter:
    """A `torch.compile` backend that counts the graphs it is given (and runs them eagerly)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def assert_compile_stages_compiles_each_stage_once(
    model, x: torch.Tensor, t: torch.Tensor, new_batch_recompiles: bool = False
) -> GraphCounter:
    """`compile_stages` with a warm-up compiles every region once, up front: switching stages and mixed batches
    (``x``, ``t``: at least two samples in each stage) compile nothing more, and give the eager model's outputs.
    With ``new_batch_recompiles``, the mixed batch (larger than the warm-up's) may compile each region once more
    (torch guards some graphs on the batch size; see `compile_stages`), and nothing after that."""
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x, t).sample
    counter = GraphCounter()
    # dynamic batch sizes from the start (a warm-up batch of 2: a batch of 1 would be specialised)
    model.compile_stages(warmup={"sample": x[:2], "timestep": t[:2]}, backend=counter, dynamic=True)
    compiled = counter.graphs
    regions = len(model.compile_regions())
    assert 0 < compiled <= regions  # regions of one structure share their graph
    with torch.no_grad():
        for stage in reversed(range(model.num_stages)):  # every stage again, in another order
            model(x[:2], t[:2], stage_index=stage)
        assert counter.graphs == compiled
        assert torch.allclose(model(x, t).sample, expected, atol=1e-6)  # every stage's network, on its own rows
        if new_batch_recompiles:
            assert counter.graphs - compiled <= regions
            compiled = counter.graphs
            for stage in range(model.num_stages):
                model(x[:2], t[:2], stage_index=stage)
            assert torch.allclose(model(x, t).sample, expected, atol=1e-6)
    assert counter.graphs == compiled
    torch._dynamo.reset()
    return counter


def assert_save_reload_bit_identical(model, folder, x: torch.Tensor, t: torch.Tensor, weight_files: Sequence[str]):
    """Safetensors only, the same config, the same partition and bit-identical outputs after a reload."""
    model.save_pretrained(folder)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")) == sorted(weight_files)
    assert not list(folder.rglob("*.bin"))
    reloaded = type(model).from_pretrained(folder)
    assert _public(reloaded.config) == _public(model.config)
    assert reloaded.partition == model.partition
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, reloaded(x, t).sample)
    return reloaded


def assert_fuse_qkv_projections_round_trip(model, x: torch.Tensor, t: torch.Tensor) -> None:
    """`fuse_qkv_projections` fuses every `Attention` (fused processors, same outputs) and `unfuse_qkv_projections`
    restores the processors. (`AttentionMixin`'s version fuses only diffusers' newer attention classes: these layers
    stayed unfused, silently, and a fused processor set afterwards failed on their missing `to_qkv`.)"""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    with torch.no_grad():
        expected = model(x, t).sample
        model.fuse_qkv_projections()
        attentions = [m for m in model.modules() if isinstance(m, Attention)]
        assert attentions and all(a.fused_projections for a in attentions)
        assert {type(p) for p in model.attn_processors.values()} == {FusedAttnProcessor2_0}
        assert torch.allclose(model(x, t).sample, expected, atol=1e-5)
        model.unfuse_qkv_projections()
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
        assert torch.allclose(model(x, t).sample, expected, atol=1e-5)


def _public(config) -> dict:
    """A config as its JSON file holds it (tuples as lists), without the private keys."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def assert_layerwise_casting_works(model, run) -> None:
    """diffusers' `enable_layerwise_casting` on (copies of) the float32 ``model``, run by ``run(model, dtype)`` (the
    model's output for the test inputs cast to ``dtype``): with bfloat16 storage (float32 compute) the output is
    finite and close to the float32 model's, with float8 storage it is finite, and with float8 storage and bfloat16
    compute (what ``model.dtype`` then says) it is finite and bfloat16. The weights are stored in the storage dtype."""
    import copy

    with torch.no_grad():
        reference = run(model, torch.float32)
    for storage, compute in (
        (torch.bfloat16, torch.float32),
        (torch.float8_e4m3fn, torch.float32),
        (torch.float8_e4m3fn, torch.bfloat16),
    ):
        cast = copy.deepcopy(model)
        cast.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
        assert cast.dtype == compute
        stored = [p for p in cast.parameters() if p.dtype == storage]
        assert sum(p.numel() for p in stored) > sum(p.numel() for p in cast.parameters()) / 2, "weights not cast"
        with torch.no_grad():
            out = run(cast, cast.dtype)
        assert out.dtype == compute and torch.isfinite(out).all(), (storage, compute)
        if storage == torch.bfloat16:
            assert torch.allclose(out, reference, atol=2e-2, rtol=2e-2), (out - reference).abs().max()
        else:
            assert (out.float() - reference).abs().max() < 1.0  # float8 keeps 3 bits of mantissa: close, not equal


def assert_group_offload_keeps_outputs(model, run, folder, blocks_per_group: Sequence[int] = (1, 2)) -> None:
    """diffusers' `enable_group_offload` (block level, ``blocks_per_group`` blocks a group, and leaf level) on copies
    of ``model``, run by ``run(model)`` (its output for the test inputs) twice, gives the model's outputs. The offloaded
    weights go to files in ``folder`` (``offload_to_disk_path``), whose offload leaves uninitialised memory in their
    place: as on an accelerator, a weight used without its group's hooks loading it first gives another output."""
    import copy

    with torch.no_grad():
        reference = run(model)
    for offload_type, blocks in [*(("block_level", n) for n in blocks_per_group), ("leaf_level", None)]:
        offloaded = copy.deepcopy(model)
        options = {"num_blocks_per_group": blocks} if blocks else {}
        path = folder / f"{offload_type}_{blocks}"
        offloaded.enable_group_offload(
            torch.device("cpu"), offload_type=offload_type, offload_to_disk_path=path, **options
        )
        with torch.no_grad():
            for _ in range(2):  # the first call writes the files, the next reads them back
                out = run(offloaded)
                assert torch.allclose(out, reference, atol=1e-6), (offload_type, blocks, (out - reference).abs().max())


class StagedModelTesterMixin:
    """Shared tests of a staged model; see the module docstring."""

    model_class: type
    stage_modules = "decoders"  # the attribute holding one network per stage
    sample_shape = (3, 8, 8)
    stage_timesteps: Sequence[float]  # one timestep inside each stage, clean stage first
    mixed_timesteps: Sequence[float]  # a batch across the stages ...
    mixed_stage_counts: Sequence[int]  # ... and how many of its samples each stage gets, per stage
    compile_stage = 1
    compile_new_batch_recompiles = False  # whether the compile test's mixed batch may recompile (see the helper)
    weight_files = ("diffusion_pytorch_model.safetensors",)
    shared_parameter: str | None = "conv_in.weight"  # a parameter every stage trains (None: nothing is shared)
    min_trainable_tensors = 1
    attention_prefixes: Sequence[str] = ()  # module prefixes that must hold attention processors
    num_attention_processors: int | None = None
    bad_configs: Sequence[tuple[dict, str]] = ()  # (overrides, regex the ValueError must match)
    device_maps: Sequence[str] = ("cpu", "auto")
    picklable = True  # False where diffusers' own blocks are not (a `lambda` attribute), as the same diffusers model

    def get_init_kwargs(self) -> dict:
        raise NotImplementedError

    def build_model(self, **overrides):
        torch.manual_seed(0)
        return self.model_class(**{**self.get_init_kwargs(), **overrides}).eval()

    def inputs(self, timesteps: Sequence[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.manual_seed(seed)
        return torch.randn(len(timesteps), *self.sample_shape, generator=generator), torch.tensor(timesteps)

    @pytest.fixture
    def model(self):
        return self.build_model()

    def test_layerwise_casting_runs_and_stays_close(self, model):
        # diffusers' `enable_layerwise_casting`, as on its own models: its skip patterns and the model's own
        x, t = self.inputs(self.mixed_timesteps)
        assert_layerwise_casting_works(model, lambda m, dtype: m(x.to(dtype), t).sample)

    def test_group_offload_gives_the_same_outputs(self, model, tmp_path):
        # diffusers' `enable_group_offload`: every stage's network is loaded by its group's hooks before its use, in a
        # mixed batch and in a batch of one stage (a sampling step's)
        x, t = self.inputs(self.mixed_timesteps)
        one, times = self.inputs(self.stage_timesteps)

        def run(m):
            alone = [m(one[i : i + 1], times[i : i + 1]).sample for i in range(len(times))]
            return torch.cat([m(x, t).sample, *alone])

        assert_group_offload_keeps_outputs(model, run, tmp_path, blocks_per_group=(1,))
        # several stages' networks in one group: loaded only when the first of them runs, so refused
        with pytest.raises(ValueError, match=r"`num_blocks_per_group`=2 .*num_blocks_per_group=1.*leaf_level"):
            model.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=2)
        assert not any(hasattr(module, "_diffusers_hook") for module in model.modules())  # nothing applied

    # ---- routing ------------------------------------------------------------------------------------------------
    def test_mixed_batch_matches_per_sample_reference(self, model):
        x, t = self.inputs(self.mixed_timesteps)
        mixed = assert_mixed_batch_matches_reference(model, x, t, self.mixed_stage_counts, self.stage_modules)
        # the stages' networks really differ: the same input through another stage gives another output
        routed_stage = int(model.partition.stage_for_timestep(t[:1])[0])
        with torch.no_grad():
            other = model(x[:1], t[:1], stage_index=(routed_stage + 1) % model.num_stages).sample
        assert not torch.allclose(other, mixed[:1], atol=1e-3)

    def test_explicit_stage_index_equals_routing(self, model):
        x, t = self.inputs([self.stage_timesteps[-1]] * 2)
        with torch.no_grad():
            routed = model(x, t).sample
            given = model(x, t, stage_index=model.num_stages - 1).sample
        assert torch.equal(routed, given)

    def test_dict_and_tuple_outputs_are_equal(self, model):
        x, t = self.inputs(self.stage_timesteps)
        with torch.no_grad():
            as_dict = model(x, t).sample
            as_tuple = model(x, t, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_dict, as_tuple[0])

    def test_compiles_with_fullgraph_given_a_stage_index(self, model):
        timestep = self.stage_timesteps[self.compile_stage]
        x, t = self.inputs([timestep] * 2)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            expected = model(x, t, stage_index=self.compile_stage).sample
            assert torch.allclose(compiled(x, t, stage_index=self.compile_stage).sample, expected, atol=1e-6)

    @pytest.mark.slow  # tracing every block of the full tiny configuration (attention, experts) takes a while
    def test_compile_stages_compiles_each_stage_once(self, model):
        x, t = self.inputs([*self.stage_timesteps] * 2)
        assert_compile_stages_compiles_each_stage_once(model, x, t, self.compile_new_batch_recompiles)

    # ---- saving and loading -----------------------------------------------------------------------------------
    def test_save_reload_is_bit_identical_and_safetensors_only(self, model, tmp_path):
        x, t = self.inputs(self.mixed_timesteps)
        assert_save_reload_bit_identical(model, tmp_path, x, t, self.weight_files)

    def test_sharded_save_in_a_subfolder_reloads_bit_identical(self, model, tmp_path):
        # diffusers' sharded checkpoints (an index and its shards; the container's in each expert folder), loaded
        # from a pipeline's component folder, with and without `low_cpu_mem_usage`
        x, t = self.inputs(self.mixed_timesteps)
        model.save_pretrained(tmp_path / "unet", max_shard_size="20KB")
        assert len(list(tmp_path.rglob("*.safetensors.index.json"))) == len(self.weight_files)
        with torch.no_grad():
            expected = model(x, t).sample
            for low_cpu_mem_usage in (True, False):
                loaded = self.model_class.from_pretrained(
                    tmp_path, subfolder="unet", low_cpu_mem_usage=low_cpu_mem_usage
                )
                assert torch.equal(loaded(x, t).sample, expected), low_cpu_mem_usage

    def test_copies_pickles_and_state_dicts_give_the_same_outputs(self, model):
        # `copy.deepcopy`, pickling, `torch.save(state_dict)` into a fresh model (`load_state_dict(strict=True)`) and
        # `from_config(model.config)` (diffusers' EMAModel) keep the model
        import copy
        import io
        import pickle

        x, t = self.inputs(self.mixed_timesteps)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        fresh = self.model_class.from_config(model.config).eval()
        fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        with torch.no_grad():
            expected = model(x, t).sample
            pickled = [pickle.loads(pickle.dumps(model))] if self.picklable else []
            for other in (copy.deepcopy(model), *pickled, fresh):
                assert _public(other.config) == _public(model.config)
                assert torch.equal(other(x, t).sample, expected), type(other)

    def test_boundaries_given_as_numpy_numbers_save_and_reload(self, model, tmp_path):
        # numpy numbers (a planner's np.quantile, the items of an array; `from_unet` turns an array into them):
        # save_pretrained raised "Object of type float32 is not JSON serializable"
        given = list(np.asarray(model.partition.boundaries, dtype=np.float32))
        built = self.build_model(stage_boundaries=given)
        built.save_pretrained(tmp_path)
        loaded = self.model_class.from_pretrained(tmp_path)
        assert loaded.partition.boundaries == built.partition.boundaries == tuple(map(float, given))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_loads_in_another_dtype(self, model, tmp_path, dtype):
        model.save_pretrained(tmp_path)
        expected = model.to(dtype)
        x, t = self.inputs(self.stage_timesteps)
        for low_cpu_mem_usage in (True, False):
            loaded = self.model_class.from_pretrained(tmp_path, torch_dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage)
            params = dict(loaded.named_parameters())
            assert params.keys() == dict(expected.named_parameters()).keys()
            assert all(p.dtype == dtype and torch.equal(p, params[n]) for n, p in expected.named_parameters())
        with torch.no_grad():
            assert torch.equal(loaded(x.to(dtype), t).sample, expected(x.to(dtype), t).sample)

    def test_saves_and_loads_a_variant(self, model, tmp_path):
        half = model.to(torch.float16)
        half.save_pretrained(tmp_path, variant="fp16")
        names = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.safetensors")]
        assert sorted(names) == sorted(n.replace(".safetensors", ".fp16.safetensors") for n in self.weight_files)
        loaded = self.model_class.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
        assert all(p.dtype == torch.float16 for p in loaded.parameters())
        assert all(torch.equal(p, dict(loaded.named_parameters())[n]) for n, p in half.named_parameters())

    def test_loads_with_a_device_map(self, model, tmp_path):
        model._get_no_split_modules("auto")  # what `device_map="auto"` asks: it must not raise
        model.save_pretrained(tmp_path)
        x, t = self.inputs(self.mixed_timesteps)
        for device_map in self.device_maps:
            loaded = self.model_class.from_pretrained(tmp_path, device_map=device_map)
            with torch.no_grad():
                assert torch.equal(loaded(x, t).sample, model(x, t).sample), device_map

    def test_auto_model_loads_it_only_with_trust_remote_code(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        module = self.model_class.__module__
        config = json.loads((tmp_path / "config.json").read_text())
        assert config["auto_map"] == {"AutoModel": f"{module.rsplit('.', 1)[-1]}.{self.model_class.__name__}"}
        code = (tmp_path / f"{module.rsplit('.', 1)[-1]}.py").read_text()
        assert code.endswith(f"from {module} import {self.model_class.__name__}  # noqa: F401\n")
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModel.from_pretrained(str(tmp_path))
        loaded = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True)  # diffusers needs a str
        assert type(loaded) is self.model_class  # the installed class itself, through the re-export file
        assert "auto_map" not in loaded.config
        x, t = self.inputs(self.mixed_timesteps)
        with torch.no_grad():
            assert torch.equal(loaded(x, t).sample, model(x, t).sample)

    def test_loading_through_the_class_never_runs_a_file_from_the_folder(self, model, tmp_path):
        model.save_pretrained(tmp_path / "saved")
        marker = tmp_path / "ran"
        for path in (tmp_path / "saved").rglob("*.py"):
            path.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        loaded = self.model_class.from_pretrained(tmp_path / "saved")
        assert not marker.exists() and type(loaded) is self.model_class

    # ---- training ---------------------------------------------------------------------------------------------
    def test_gradient_checkpointing_gives_the_same_gradients(self, model):
        model.train()
        x, t = self.inputs(self.stage_timesteps)

        def gradients():
            model.zero_grad()
            model(x, t).sample.square().mean().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        plain = gradients()
        checkpointed_calls = []

        def checkpoint(module, *args):
            checkpointed_calls.append(type(module).__name__)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
        assert model.is_gradient_checkpointing
        checkpointed = gradients()
        assert checkpointed_calls  # the checkpointing really ran
        assert plain.keys() == checkpointed.keys() and len(plain) >= self.min_trainable_tensors
        assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
        # every stage's network learns (from its own samples), and what the stages share learns from all
        assert all(any(n.startswith(f"{self.stage_modules}.{s}.") for n in plain) for s in range(model.num_stages))
        assert self.shared_parameter is None or self.shared_parameter in plain
        model.disable_gradient_checkpointing()
        assert not model.is_gradient_checkpointing

    # ---- attention and configuration --------------------------------------------------------------------------
    def test_attention_processors_can_be_swapped(self, model):
        processors = model.attn_processors
        assert all(any(name.startswith(prefix) for name in processors) for prefix in self.attention_prefixes)
        assert self.num_attention_processors is None or len(processors) == self.num_attention_processors
        x, t = self.inputs(self.stage_timesteps)
        with torch.no_grad():
            before = model(x, t).sample
            model.set_attn_processor(AttnProcessor2_0())
            model.set_default_attn_processor()
            assert all(type(p) is AttnProcessor for p in model.attn_processors.values())
            assert torch.allclose(model(x, t).sample, before, atol=1e-5)

    def test_bad_configuration_names_the_argument(self):
        assert self.bad_configs
        for overrides, message in self.bad_configs:
            with pytest.raises(ValueError, match=message):
                self.build_model(**overrides)
