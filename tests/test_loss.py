"""The objective against independent references."""

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from train.config import ModelConfig
from train.likelihood import bernoulli_nll
from train.loss import vae_loss
from train.model import DiagonalGaussian, build_model


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(8, 16) * 2, torch.randn(8, 16)
    posterior = DiagonalGaussian(mean, logvar)
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=1)
    torch.testing.assert_close(posterior.kl(), reference, rtol=1e-5, atol=1e-5)


def test_bce_matches_direct_bernoulli_log_likelihood(mnist5k):
    torch.manual_seed(0)
    x = torch.from_numpy(mnist5k.images[:6]).permute(0, 3, 1, 2).float() / 255
    logits = torch.randn_like(x) * 3
    # binary targets: the textbook Bernoulli log-likelihood
    binary = (x > 0.5).float()
    direct = -Bernoulli(logits=logits).log_prob(binary).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_nll(logits, binary), direct, rtol=1e-5, atol=1e-4)
    # grey targets: cross-entropy -[x log p + (1-x) log(1-p)] written out
    p = torch.sigmoid(logits.double())
    explicit = -(x * torch.log(p) + (1 - x) * torch.log1p(-p)).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_nll(logits, x).double(), explicit, rtol=1e-5, atol=1e-3)


def test_loss_terms_shapes_and_elbo():
    model = build_model(ModelConfig())
    x = torch.rand(5, 1, 28, 28)
    logits, posterior = model(x)
    terms = vae_loss(logits, x, posterior)
    assert terms.recon.shape == (5,) and terms.kl.shape == (5,)
    torch.testing.assert_close(terms.negative_elbo(0.5), terms.recon + 0.5 * terms.kl)
    assert logits.shape == x.shape and torch.all(terms.kl >= 0)


def test_reparameterised_sample_has_the_posterior_moments():
    posterior = DiagonalGaussian(torch.full((20000, 2), 3.0), torch.full((20000, 2), 2 * torch.log(torch.tensor(0.5))))
    z = posterior.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), torch.tensor([3.0, 3.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 0.5]), atol=0.02, rtol=0)


def test_model_handles_other_sizes_and_channels():
    model = build_model(ModelConfig(image_size=32, channels=3, latent_dim=8))
    logits, posterior = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 3, 32, 32) and posterior.mean.shape == (2, 8)
    assert F.mse_loss(logits, logits) == 0
