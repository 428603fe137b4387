"""serve's runtime, likelihoods and numpy pieces against independent references (torch, sklearn)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serve.likelihoods import negative_log_likelihood
from serve import ops
from serve.ops import Direct, interpolate_latents, score_noise
from serve.runtime import RuntimeOptions, VAERuntime, choose_providers, parse_providers


@pytest.fixture(scope="module")
def runtime(exported_model) -> VAERuntime:
    return VAERuntime(exported_model, options=RuntimeOptions(providers=("CPUExecutionProvider",)))


@pytest.fixture(scope="module")
def real_x(small_shards) -> np.ndarray:
    from pipeline.images import nhwc_to_nchw, to_unit_float
    from pipeline.loader import open_split
    from pipeline.shards import read_shard_images

    val = open_split(str(small_shards), "val")
    images, _ = read_shard_images(val.urls[0], val.manifest.image_shape)
    return nhwc_to_nchw(to_unit_float(images[:48]))


# ---------------------------------------------------------------- likelihoods, synthetic arrays

def _synthetic(seed: int, channels: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(3, channels, 5, 4)) / 255.0
    x[0, 0, 0, :2] = (0.0, 1.0)  # both edge bins present
    return rng, x


def test_bernoulli_nll_matches_torch_bce():
    rng, x = _synthetic(0)
    logits = rng.normal(0, 8, size=x.shape)
    expected = F.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(x), reduction="none")
    np.testing.assert_allclose(negative_log_likelihood("bernoulli", logits, x),
                               expected.flatten(1).sum(1).numpy(), rtol=1e-10)


def test_gaussian_nll_matches_torch_normal():
    rng, x = _synthetic(1)
    mean = rng.uniform(0, 1, size=x.shape)
    expected = -torch.distributions.Normal(torch.tensor(mean), 0.3).log_prob(torch.tensor(x)).flatten(1).sum(1)
    np.testing.assert_allclose(negative_log_likelihood("gaussian", mean, x, {"sigma": 0.3}), expected.numpy(),
                               rtol=1e-10)
    with pytest.raises(ValueError, match="sigma"):
        negative_log_likelihood("gaussian", mean, x, {"sigma": 0.0})


def test_gaussian_learned_nll_matches_torch_normal():
    rng, x = _synthetic(2)
    mean, log_sigma = rng.uniform(0, 1, size=x.shape), rng.normal(-2, 1, size=x.shape)
    params = np.concatenate([mean, log_sigma], axis=1)  # [mean, log_sigma] on the channel axis
    expected = -torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(log_sigma))).log_prob(
        torch.tensor(x)).flatten(1).sum(1)
    np.testing.assert_allclose(negative_log_likelihood("gaussian_learned", params, x), expected.numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="expected params of shape"):
        negative_log_likelihood("gaussian_learned", mean, x)


def test_discretized_logistic_matches_direct_bin_probabilities():
    rng, x = _synthetic(3)
    # scales broad enough that the direct CDF difference does not underflow to 0
    mean, log_scale = rng.uniform(0, 1, size=x.shape), rng.normal(-1.5, 0.3, size=x.shape)
    params = np.concatenate([mean, log_scale], axis=1)

    def cdf(t):  # the logistic CDF, written out directly in float64
        return 1.0 / (1.0 + np.exp(-(t - mean) / np.exp(log_scale)))

    half = 0.5 / 255
    probability = np.where(x == 0, cdf(half), np.where(x == 1, 1.0 - cdf(1 - half), cdf(x + half) - cdf(x - half)))
    expected = -np.log(probability).reshape(3, -1).sum(1)
    np.testing.assert_allclose(negative_log_likelihood("discretized_logistic", params, x), expected, rtol=1e-8)


def test_discretized_logistic_bins_sum_to_one():
    """The 256 bin probabilities of one pixel form a distribution, for sharp and broad scales alike."""
    for mean, log_scale in ((0.3, -6.0), (0.97, -2.0), (0.5, 1.0)):
        x = (np.arange(256) / 255.0).reshape(256, 1, 1, 1)
        params = np.concatenate([np.full_like(x, mean), np.full_like(x, log_scale)], axis=1)
        total = np.exp(-negative_log_likelihood("discretized_logistic", params, x)).sum()
        assert total == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "gaussian_learned", "discretized_logistic"])
def test_every_training_likelihood_has_a_numpy_twin_that_agrees(name):
    """train's likelihood objects and serve's numpy functions: the same names, layouts, constants and NLLs."""
    from serve.likelihoods import LIKELIHOODS, PARAMS_PER_CHANNEL
    from train.config import LIKELIHOODS as CONFIG_NAMES, ModelConfig
    from train.likelihood import LIKELIHOODS as TRAIN_LIKELIHOODS, likelihood_for

    assert set(CONFIG_NAMES) == set(TRAIN_LIKELIHOODS) == set(LIKELIHOODS) == set(PARAMS_PER_CHANNEL)
    likelihood = likelihood_for(ModelConfig(likelihood=name, channels=2, gaussian_sigma=0.3))
    rng, x = _synthetic(7)
    channels = likelihood.param_channels(2)
    assert channels == PARAMS_PER_CHANNEL[name] * 2
    raw = torch.from_numpy(rng.normal(0.5, 1.0, size=(3, channels, 5, 4))).float()
    params = likelihood.constrain(raw)  # the bounds decode applies
    expected = likelihood.nll(params, torch.from_numpy(x).float()).double().numpy()
    got = negative_log_likelihood(name, params.double().numpy(), x, likelihood.constants())
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_unknown_likelihood_is_named():
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        negative_log_likelihood("poisson", np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))


# ---------------------------------------------------------------- score on the real model vs PyTorch

def test_score_matches_pytorch_elbo_and_iwae(runtime, trained_run, real_x):
    from train import load_model

    model = load_model(trained_run)
    num_samples, seed = 8, 3
    eps = torch.from_numpy(score_noise(len(real_x), num_samples, runtime.latent_dim, seed)).double()
    with torch.no_grad():
        x = torch.from_numpy(real_x).double()
        posterior = model.encode(torch.from_numpy(real_x))
        mean, logvar = posterior.mean.double(), posterior.logvar.double()
        z = mean + torch.exp(0.5 * logvar) * eps  # (K, B, latent)
        logits = model.decode(z.reshape(-1, runtime.latent_dim).float()).double().reshape(num_samples, *real_x.shape)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(2).sum(2)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(2)
        log_qz = torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(2)
        elbo_score = (-log_px).mean(0) + kl
        iwae_score = -(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(num_samples))
    direct = Direct(runtime)
    np.testing.assert_allclose(direct.run(ops.score, real_x, num_samples, "elbo", seed, kind="likelihood").scores,
                               elbo_score.numpy(), rtol=2e-4)
    np.testing.assert_allclose(direct.run(ops.score, real_x, num_samples, "iwae", seed, kind="likelihood").scores,
                               iwae_score.numpy(), rtol=2e-4)
    # the importance-weighted bound is the tighter one
    iwae, elbo = (direct.run(ops.score, real_x, 64, method, 0, kind="likelihood").scores for method in ("iwae", "elbo"))
    assert iwae.mean() < elbo.mean()


def test_seeded_runs_are_reproducible_and_chunking_does_not_matter(exported_model, runtime, real_x):
    small = VAERuntime(exported_model, options=RuntimeOptions(providers=("CPUExecutionProvider",), batch_size=7))
    a = Direct(runtime).run(ops.sample, 40, seed=5, temperature=0.8)
    np.testing.assert_array_equal(a, Direct(runtime).run(ops.sample, 40, seed=5, temperature=0.8))
    np.testing.assert_allclose(a, Direct(small).run(ops.sample, 40, seed=5, temperature=0.8), atol=1e-6)
    assert np.abs(a - Direct(runtime).run(ops.sample, 40, seed=6, temperature=0.8)).max() > 0.1
    assert a.shape == (40, 1, 28, 28) and 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(Direct(runtime).run(ops.encode, real_x).sample(1),
                                  Direct(runtime).run(ops.encode, real_x).sample(1))
    np.testing.assert_allclose(Direct(runtime).run(ops.score, real_x, 4, seed=2).scores,
                               Direct(small).run(ops.score, real_x, 4, seed=2).scores, rtol=1e-5)


def test_io_binding_gives_the_same_answers(exported_model, runtime, real_x):
    bound = VAERuntime(exported_model, options=RuntimeOptions(providers=("CPUExecutionProvider",), io_binding=True))
    assert bound.encoder.io_binding and not runtime.encoder.io_binding
    np.testing.assert_allclose(Direct(bound).run(ops.reconstruct, real_x), Direct(runtime).run(ops.reconstruct, real_x),
                               atol=1e-6)


def test_reconstruct_is_closer_to_the_input_than_samples(runtime, real_x):
    recon_error = np.abs(Direct(runtime).run(ops.reconstruct, real_x) - real_x).mean()
    sample_error = np.abs(Direct(runtime).run(ops.sample, len(real_x), seed=0) - real_x).mean()
    assert recon_error < 0.6 * sample_error, (recon_error, sample_error)


def test_interpolate_endpoints_are_the_reconstructions(runtime, real_x):
    recon = Direct(runtime).run(ops.reconstruct, real_x[:2])
    for mode in ("linear", "slerp"):
        path = Direct(runtime).run(ops.interpolate, real_x[:2], steps=6, mode=mode)
        assert path.shape == (6, 1, 28, 28) and 0.0 <= path.min() and path.max() <= 1.0
        np.testing.assert_allclose(path[[0, -1]], recon, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        Direct(runtime).run(ops.interpolate, real_x[:2], mode="cubic")


def test_pixel_maps_sum_to_the_reconstruction_term_of_the_score(runtime, real_x):
    """Each map is -log p(x|z) per pixel; the negative ELBO is its sum plus the analytic KL."""
    result = Direct(runtime).run(ops.score, real_x, 4, "elbo", 3, maps=True, kind="likelihood")
    posterior = Direct(runtime).run(ops.encode, real_x)
    mean, logvar = posterior.mean.astype(np.float64), posterior.logvar.astype(np.float64)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=1)
    assert result.maps.shape == (len(real_x), 28, 28) and (result.maps > 0).all()  # Bernoulli: -log p > 0
    np.testing.assert_allclose(result.maps.sum(axis=(1, 2)), result.scores - kl, rtol=1e-6)
    assert Direct(runtime).run(ops.score, real_x, 4, "elbo", 3).maps is None  # only when asked for


def test_a_bright_defect_painted_into_a_digit_is_the_hottest_region_of_its_map(runtime, real_x):
    digit = real_x[0].copy()
    corner = (slice(None), slice(1, 6), slice(1, 6))
    assert digit[corner].max() < 0.1  # background in the original
    digit[corner] = 1.0
    clean, defective = Direct(runtime).run(ops.score, np.stack([real_x[0], digit]), 2, "elbo", 0, maps=True).maps
    hottest = np.unravel_index(defective.argmax(), defective.shape)
    assert 1 <= hottest[0] < 6 and 1 <= hottest[1] < 6, hottest
    inside = np.zeros((28, 28), bool)
    inside[1:6, 1:6] = True
    assert defective[inside].mean() > 5 * defective[~inside].mean()
    assert defective[inside].sum() > 10 * clean[inside].sum()  # the defect, not a region this digit always has


def test_slerp_keeps_the_norm_between_equal_norm_endpoints():
    a, b = np.array([3.0, 0.0, 0.0]), np.array([0.0, 0.0, 3.0])
    path = interpolate_latents(a, b, 7, "slerp")
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(interpolate_latents(a, b, 3, "linear")[1], [1.5, 0, 1.5])


def test_traverse_varies_only_the_chosen_dimension(runtime, real_x):
    grid = Direct(runtime).run(ops.traverse, real_x[0], dims=[0, 5], value_range=(-2.0, 2.0), steps=5)
    assert grid.shape == (2, 5, 1, 28, 28)
    assert np.abs(grid[:, 0] - grid[:, -1]).max() > 0.05  # moving along a dimension changes the image
    with pytest.raises(ValueError, match="latent dimensions must lie in"):
        Direct(runtime).run(ops.traverse, real_x[0], dims=[16])


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3, 28, 28), np.float32), "expected 1 channel, got 3"),
    (np.zeros((2, 1, 32, 28), np.float32), "expected 28x28 images, got 32x28"),
    (np.zeros((1, 28, 28), np.float32), "expected images of shape"),
    (np.full((1, 1, 28, 28), np.nan, np.float32), "NaN or Inf"),
    (np.full((1, 1, 28, 28), 255.0, np.float32), r"must lie in \[0, 1\]"),
    (np.zeros((1, 1, 28, 28), np.uint8), "expected float pixels"),
])
def test_bad_images_are_named(runtime, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Direct(runtime).run(ops.encode, bad)


def test_bad_latents_are_named(runtime):
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 16\)"):
        Direct(runtime).run(ops.decode, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Direct(runtime).run(ops.decode, np.full((1, 16), np.inf, np.float32))


def test_providers_only_use_a_gpu_that_exists():
    from serve.runtime import nvidia_gpu_present

    assert parse_providers("trt, cuda,cpu") == ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                 "CPUExecutionProvider")
    chosen = choose_providers(parse_providers("tensorrt,cuda"))
    assert chosen[-1] == "CPUExecutionProvider"
    if not nvidia_gpu_present():
        assert chosen == ["CPUExecutionProvider"]


def test_tune_batch_size_picks_a_candidate(exported_model):
    tuned = VAERuntime(exported_model, options=RuntimeOptions(providers=("CPUExecutionProvider",)))
    assert tuned.tune_batch_size((16, 128), seconds=0.2) in (16, 128)


def test_unknown_variant_is_named(exported_model):
    with pytest.raises(ValueError, match="no variant 'int4'"):
        VAERuntime(exported_model, options=RuntimeOptions(variant="int4"))


# ---------------------------------------------------------------- analysis helpers vs sklearn

def test_roc_auc_and_pca_match_sklearn():
    from sklearn.decomposition import PCA
    from sklearn.metrics import roc_auc_score

    from serve.analysis import pca, roc_auc, threshold_for_fpr

    rng = np.random.default_rng(0)
    positives = rng.random(300) < 0.2
    scores = np.round(rng.normal(size=300) + positives, 1)  # rounded: ties across classes
    assert roc_auc(scores, positives) == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
    features = rng.normal(size=(200, 6)) * [5, 3, 1, 1, 1, 1]
    np.testing.assert_allclose(np.abs(pca(features, 2)), np.abs(PCA(2).fit_transform(features)), atol=1e-8)
    normal = rng.normal(size=10_000)
    assert np.mean(normal > threshold_for_fpr(normal, 0.05)) <= 0.05
    assert np.mean(normal > threshold_for_fpr(normal, 0.05)) > 0.045


def test_complexity_correction_subtracts_the_png_code_length(runtime, real_x):
    from pipeline.images import png_code_nats

    plain = Direct(runtime).run(ops.score, real_x, 2, seed=3, kind="likelihood").scores
    corrected = Direct(runtime).run(ops.score, real_x, 2, seed=3, complexity="png").scores
    np.testing.assert_allclose(plain - corrected, png_code_nats(real_x))
    blank, noise = np.zeros((1, 1, 28, 28), np.float32), np.random.default_rng(0).random((1, 1, 28, 28), np.float32)
    assert png_code_nats(blank)[0] < 0.2 * png_code_nats(noise)[0]  # a flat image compresses far better
    with pytest.raises(ValueError, match="complexity must be one of"):
        Direct(runtime).run(ops.score, real_x, complexity="zip")
