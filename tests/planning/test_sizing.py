"""`diffusers_stages.planning.sizing`: the data spectrum the decoder sizes are read from."""

import torch

from diffusers_stages.planning.sizing import data_spectrum


def test_the_spectrum_of_images_that_require_grad_builds_no_autograd_graph():
    # latents encoded with autograd on: the covariance (or the subset's singular values) recorded a graph over the
    # whole data set, as the optimal denoiser did
    data = torch.randn(40, 1, 4, 4, generator=torch.manual_seed(0)).requires_grad_(True)
    for max_dim in (4096, 4):  # the exact covariance, and the spectrum of a subset of wide data
        spectrum = data_spectrum(data, max_dim=max_dim, generator=torch.manual_seed(0))
        assert not spectrum.requires_grad
        assert torch.equal(spectrum, data_spectrum(data.detach(), max_dim=max_dim, generator=torch.manual_seed(0)))
