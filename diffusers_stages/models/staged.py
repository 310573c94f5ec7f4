"""What every staged model shares: a partition of the noise schedule, input checks, the routing of a batch to
per-stage networks (decoders or experts), and a saved folder that diffusers' `AutoModel` can load."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    CROSS_ATTENTION_PROCESSORS,
    AttnAddedKVProcessor,
    AttnProcessor,
)

from ..partition import TimestepPartition
from ..routing import dispatch_by_stage
from .checks import check_class_labels, check_sample, per_sample_timesteps
from .loading import reexport_source

PACKAGE = __name__.split(".")[0]


class StagedModelMixin:
    r"""
    Mixin of the package's staged models: one network (a decoder, an expert) per stage of a [`TimestepPartition`].

    A model sets ``self.partition`` in its ``__init__`` (from its ``_check_config``) and routes in its ``forward``
    with [`~StagedModelMixin.route`] (any per-stage callable) or [`~StagedModelMixin.decode`] (per-stage decoders that
    share an encoder's output).
    """

    partition: TimestepPartition

    # ---- saving: diffusers' `auto_map` convention -------------------------------------------------------------
    @classmethod
    def _auto_map_module(cls) -> str | None:
        """The file (without ``.py``) that a saved folder's ``auto_map`` names: the class's module, for the package's
        own classes; `None` (no ``auto_map``) for subclasses defined elsewhere."""
        return cls.__module__.rsplit(".", 1)[-1] if cls.__module__.split(".")[0] == PACKAGE else None

    def to_json_string(self) -> str:
        """The config as `config.json` holds it, with ``auto_map`` (``{"AutoModel": "<file>.<class>"}``): what
        `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` follows to this class."""
        config = json.loads(super().to_json_string())
        module = self._auto_map_module()
        if module is not None:
            config["auto_map"] = {"AutoModel": f"{module}.{type(self).__name__}"}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write `config.json` and the re-export file its ``auto_map`` names (an import of the installed class).
        Loading through the package's own classes never reads that file."""
        module = self._auto_map_module()
        if module is not None and not os.path.isfile(save_directory):
            os.makedirs(save_directory, exist_ok=True)
            with open(os.path.join(save_directory, f"{module}.py"), "w", encoding="utf-8") as f:
                f.write(reexport_source(type(self).__module__, type(self).__name__))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """As diffusers', without the ``auto_map`` entry (it is for `AutoModel`, not a constructor argument)."""
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)

    @property
    def num_stages(self) -> int:
        """The number of stages (decoders, experts)."""
        return self.partition.num_stages

    def check_inputs(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        stage_index: int | None,
        in_channels: int | None = None,
        multiple_of: int = 1,
    ) -> torch.Tensor:
        """Check ``sample`` and ``timestep`` (values only on the routed path, ``stage_index=None``: see
        `diffusers_stages.models.checks`) and return one timestep per sample."""
        check_sample(sample, in_channels, multiple_of=multiple_of)
        return per_sample_timesteps(timestep, sample.shape[0], sample.device, check_values=stage_index is None)

    def check_labels(
        self,
        class_labels: torch.Tensor | None,
        batch: int,
        stage_index: int | None,
        num_labels: int | None,
        one_hot: bool = False,
    ) -> None:
        """Check ``class_labels`` against the model's ``class_embedding`` (values only on the routed path)."""
        conditional = getattr(self, "class_embedding", None) is not None
        check_class_labels(class_labels, batch, conditional, num_labels, stage_index is None, one_hot=one_hot)

    def route(
        self,
        timesteps: torch.Tensor,
        stage_index: int | None,
        run_stage: Callable[[int, torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """Run ``run_stage(stage, rows)`` for each stage on its own samples (see `dispatch_by_stage`)."""
        return dispatch_by_stage(self.partition, timesteps, stage_index, run_stage)

    def decode(
        self,
        hidden: torch.Tensor,
        skips: Sequence[torch.Tensor],
        emb: torch.Tensor,
        timesteps: torch.Tensor,
        stage_index: int | None,
    ) -> torch.Tensor:
        """Decode a shared encoder's output (``hidden``, ``skips``, embedding ``emb``) with ``self.decoders``: each
        stage's decoder on its own samples only (the whole batch when one stage holds it)."""

        def run_decoder(stage: int, rows: torch.Tensor | None) -> torch.Tensor:
            if rows is None:
                return self.decoders[stage](hidden, skips, emb)
            return self.decoders[stage](hidden[rows], [skip[rows] for skip in skips], emb[rows])

        return self.route(timesteps, stage_index, run_decoder)

    def set_default_attn_processor(self) -> None:
        """Use diffusers' default attention implementation in every decoder or expert, as diffusers' U-Nets do (the
        model must also be an `AttentionMixin`); custom processors of other kinds are a `ValueError`."""
        kinds = {type(processor) for processor in self.attn_processors.values()}
        if kinds <= set(ADDED_KV_ATTENTION_PROCESSORS):
            processor = AttnAddedKVProcessor()
        elif kinds <= set(CROSS_ATTENTION_PROCESSORS):
            processor = AttnProcessor()
        else:
            names = sorted(kind.__name__ for kind in kinds)
            raise ValueError(f"`set_default_attn_processor` needs default attention processors, got {names}.")
        self.set_attn_processor(processor)
