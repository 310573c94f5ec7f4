"""Conversion scripts: bring existing checkpoints in, take staged models out.

Each module is a command (`python -m diffusers_stages.conversion.<name> --help`, or `python conversion/<name>.py`):

- `unet_to_multistage`: a diffusers `UNet2DModel`, `DDPMPipeline`, `DDIMPipeline` or `LDMPipeline` folder -> a
  `MultiStagePipeline` whose stages start as exact copies of the source.
- `multistage_to_unet`: one stage of a `MultiStagePipeline` -> a plain diffusers `UNet2DModel` folder.
- `original_multistage`: latent-diffusion `UNetModel_multistage` checkpoints of the public multi-stage code
  (LucasYFL/Multistage_Diffusion) -> a `MultiStagePipeline` with a `MultiStageUNet2DModel`, through an explicit
  key-rename table.
- `original_multistage_edm`: EDM `MultistageUNet` (DDPM++) checkpoints of the same code -> a `MultiStagePipeline`
  with a `MultiStageDDPMppUNet2DModel` and an EDM scheduler, through an explicit key-rename table.
- `original_multistage_ncsnpp`: score_sde `ncsnpp_multistage` (NCSN++, continuous-time VP) checkpoints of the same
  code -> a `MultiStagePipeline` with a `MultiStageDDPMppUNet2DModel` and the authors' DPM-Solver sampler.
- `pipelines_to_experts`: several single diffusers pipelines -> one expert-routing or dual-backbone pipeline.
"""
