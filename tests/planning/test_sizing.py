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


def test_decoder_widths_refuse_a_difficulty_that_is_not_finite_by_name():
    # NaN failed with "cannot convert float NaN to integer", infinity with an OverflowError, neither naming `difficulty`
    import math

    import pytest

    from diffusers_stages.planning import suggest_decoder_widths

    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="`difficulty` needs one non-negative finite value per stage"):
            suggest_decoder_widths((32, 64), [bad, 0.5, 0.1], 8)
