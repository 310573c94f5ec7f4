"""Evidence benchmarks for diffusers-stages: the three papers' claims measured on small real data sets, offline.

Run everything with ``python benchmarks/run_evidence.py --quick`` (see ``benchmarks/README`` section of the
project README). The modules, in the order the benchmark uses them:

- `data`: sklearn digits (8x8) and Fashion-MNIST (Debian ``dataset-fashion-mnist``, padded to 32x32), in [-1, 1].
- `metric`: a small classifier trained once (seeded, cached); "FD-classifier" = Frechet distance on its features,
  plus its accuracy on class-conditional samples. Not FID: no Inception network is involved.
- `flops`: training FLOPs per step and sampling FLOPs per image with `torch.utils.flop_counter.FlopCounterMode`.
- `training`: a FLOP-budgeted training loop with checkpoints at fractions of the budget.
- `comparisons`: the three comparisons of issue 7; `report`: the markdown table and plots.
"""
