"""serve/scores.py's and export/score_statistics.py's candidate anomaly scores against independent computations (torch, scipy, sklearn, loops)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.preprocessing import StandardScaler

from serve.likelihoods import negative_log_likelihood
from serve import ops
from serve.runtime import RuntimeOptions, VAERuntime
from export.score_statistics import Standardiser, bernoulli_entropy, combine, squared_error
from serve.scores import (ACTIVITY_EDGES, MIN_LAPLACE_SCALE, ModelOutputs, base_scores, kl_to_prior, latent_norm,
                          local_predictor_nats, med_prediction, model_outputs)


@pytest.fixture(scope="module")
def digits(mnist5k) -> np.ndarray:
    """24 real digits as (B, 1, 28, 28) floats in [0, 1], two of each class and four more."""
    picks = np.concatenate([np.flatnonzero(mnist5k.labels == c)[:2] for c in range(10)] + [np.arange(300, 304)])
    return (mnist5k.images[picks].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


def test_kl_to_prior_matches_torch_distributions():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    posterior = torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * logvar)))
    prior = torch.distributions.Normal(torch.zeros(5, 7, dtype=torch.float64), torch.ones(5, 7, dtype=torch.float64))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=1).numpy()
    np.testing.assert_allclose(kl_to_prior(mean, logvar), expected, rtol=1e-12)
    np.testing.assert_allclose(latent_norm(mean), [np.sqrt(sum(v * v for v in row)) for row in mean], rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(B, latent\)"):
        kl_to_prior(mean, logvar[:, :3])


def test_squared_error_is_sklearns_mean_squared_error_times_pixels(digits):
    from sklearn.metrics import mean_squared_error

    noisy = np.clip(digits + np.random.default_rng(1).normal(0, 0.1, digits.shape), 0, 1)
    expected = [mean_squared_error(a.ravel(), b.ravel()) * a.size for a, b in zip(digits, noisy)]
    np.testing.assert_allclose(squared_error(digits, noisy), expected, rtol=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        squared_error(digits, noisy[:, :, :27])


def test_bernoulli_entropy_is_scipys_and_the_floor_of_the_bernoulli_likelihood(digits):
    expected = [sum(stats.bernoulli(p).entropy() for p in image.ravel().astype(np.float64)) for image in digits[:3]]
    np.testing.assert_allclose(bernoulli_entropy(digits[:3]), expected, rtol=1e-9)
    # a decoder that outputs p = x exactly reaches the floor; any other p costs more
    x = np.clip(digits.astype(np.float64), 1e-6, 1 - 1e-6)
    logits = np.log(x) - np.log1p(-x)
    np.testing.assert_allclose(negative_log_likelihood("bernoulli", logits, x), bernoulli_entropy(x), rtol=1e-6)
    assert (negative_log_likelihood("bernoulli", logits + 0.3, x) > bernoulli_entropy(x)).all()


def med_loop(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JPEG-LS's median edge detector written out pixel by pixel (0 outside the image)."""
    height, width = image.shape
    at = lambda r, c: int(image[r, c]) if 0 <= r < height and 0 <= c < width else 0  # noqa: E731
    prediction, activity = np.zeros((height, width), int), np.zeros((height, width), int)
    for r in range(height):
        for c in range(width):
            a, b, cc, d = at(r, c - 1), at(r - 1, c), at(r - 1, c - 1), at(r - 1, c + 1)
            prediction[r, c] = min(a, b) if cc >= max(a, b) else max(a, b) if cc <= min(a, b) else a + b - cc
            activity[r, c] = abs(a - cc) + abs(b - cc) + abs(cc - d)
    return prediction, activity


def test_local_predictor_matches_a_pixel_loop_and_scipys_laplace(digits):
    pixels = np.rint(digits[:2] * 255.0)
    prediction, activity = med_prediction(pixels)
    for image, p, a in zip(pixels, prediction, activity):
        expected_p, expected_a = med_loop(image[0])
        np.testing.assert_array_equal(p[0], expected_p)
        np.testing.assert_array_equal(a[0], expected_a)
    for image, nats in zip(pixels, local_predictor_nats(digits[:2])):
        expected_p, expected_a = med_loop(image[0])
        residual, context = (image[0] - expected_p).ravel(), np.digitize(expected_a, ACTIVITY_EDGES).ravel()
        total = 0.0
        for k in np.unique(context):
            r = residual[context == k]
            laplace = stats.laplace(scale=max(np.abs(r).mean(), MIN_LAPLACE_SCALE))
            n = np.abs(r[r != 0])  # P(r = n) = sf(n - 1/2) - sf(n + 1/2), in logs: far tails underflow otherwise
            upper, lower = laplace.logsf(n - 0.5), laplace.logsf(n + 0.5)
            total -= (upper + np.log1p(-np.exp(lower - upper))).sum()
            total -= (r == 0).sum() * np.log(laplace.cdf(0.5) - laplace.cdf(-0.5))
        assert nats == pytest.approx(total, rel=1e-9)
    # a flat image costs less than a digit, noise more
    flat = np.full((1, 1, 28, 28), 0.5, np.float32)
    noise = np.random.default_rng(0).random((1, 1, 28, 28)).astype(np.float32)
    assert local_predictor_nats(flat)[0] < local_predictor_nats(digits[:1])[0] < local_predictor_nats(noise)[0]


def test_standardiser_matches_sklearn_and_round_trips_json():
    rng = np.random.default_rng(2)
    train = {"a": rng.normal(3, 2, 200), "b": rng.normal(-1, 0.5, 200)}
    fitted = Standardiser.fit(train)
    new = {"a": rng.normal(3, 2, 10), "b": rng.normal(-1, 0.5, 10)}
    scaler = StandardScaler().fit(np.stack([train["a"], train["b"]], axis=1))
    expected = scaler.transform(np.stack([new["a"], new["b"]], axis=1))
    np.testing.assert_allclose(fitted.z("a", new["a"]), expected[:, 0], rtol=1e-12)
    np.testing.assert_allclose(combine(fitted, new, "sum"), expected.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(combine(fitted, new, "max"), expected.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(combine(fitted, new, "sum", two_sided=("a",)),
                               np.abs(expected[:, 0]) + expected[:, 1], rtol=1e-12)
    assert Standardiser.from_json(fitted.to_json()) == fitted
    with pytest.raises(ValueError, match=r"\['c'\] do not vary"):
        Standardiser.fit({"c": np.ones(5)})
    with pytest.raises(KeyError, match="no fitted statistics for score 'd'"):
        fitted.z("d", new["a"])
    with pytest.raises(ValueError, match="combination must be one of"):
        combine(fitted, new, "mean")


def test_base_scores_from_a_real_model_agree_with_the_runtimes_own_scores(exported_model, digits):
    device = ops.Direct(VAERuntime(exported_model, options=RuntimeOptions(providers=("CPUExecutionProvider",))))
    outputs = model_outputs(device, digits, num_samples=3, seed=5)
    assert isinstance(outputs, ModelOutputs)
    scores = base_scores(outputs, device.card.likelihood, device.card.likelihood_params)
    assert set(scores) == {"neg_elbo", "iwae", "recon_nll", "recon_mse", "kl", "latent_norm", "local_corrected",
                           "png_corrected", "bernoulli_excess"}
    def score(**kwargs):
        return device.run(ops.score, digits, num_samples=3, seed=5, **kwargs).scores

    np.testing.assert_allclose(scores["neg_elbo"], score(kind="likelihood"), rtol=1e-6)
    np.testing.assert_allclose(scores["iwae"], score(kind="likelihood", method="iwae"), rtol=1e-6)
    np.testing.assert_allclose(scores["png_corrected"], score(complexity="png"), rtol=1e-6)
    posterior = device.run(ops.encode, digits)
    reconstructions = device.run(ops.reconstruct, digits)
    np.testing.assert_allclose(scores["recon_mse"], ((reconstructions - digits) ** 2).sum(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(scores["kl"], kl_to_prior(posterior.mean, posterior.logvar), rtol=1e-6)
    # the Bernoulli NLL never falls below the pixels' entropy, so the excess is at least the KL term
    assert (scores["bernoulli_excess"] >= scores["kl"] - 1e-6).all()
    assert all(np.isfinite(s).all() and s.shape == (len(digits),) for s in scores.values())


# ---------------------------------------------------------------- the default score export stores and serve applies

def test_export_fits_statistics_that_standardise_its_own_validation_images(exported_model, small_shards):
    """The card's means and spreads, fitted in PyTorch at export, are those serve's own base scores (ONNX,
    numpy) have on the same validation images: z-scores of mean ~0 and spread ~1."""
    from serve.__main__ import read_input

    runtime = VAERuntime(exported_model, options=RuntimeOptions(providers=("CPUExecutionProvider",)))
    statistics = runtime.card.score_statistics
    assert statistics.default == "excess_mse"  # a Bernoulli model: the PNG correction does not fit its units
    assert set(statistics.standardiser.means) == {"neg_elbo", "png_corrected", "recon_mse", "bernoulli_excess"}
    x, _, _ = read_input(str(small_shards), runtime, "val")
    assert statistics.num_images == len(x) and statistics.num_samples == 1
    base = base_scores(model_outputs(ops.Direct(runtime), x, num_samples=1, seed=11), "bernoulli", {})
    for name in statistics.standardiser.means:
        z = statistics.standardiser.z(name, base[name])
        assert abs(z.mean()) < 0.15 and 0.8 < z.std() < 1.25, (name, z.mean(), z.std())
    # no sampling in the reconstruction error: PyTorch at export and onnxruntime here agree closely
    np.testing.assert_allclose(base["recon_mse"].mean(), statistics.standardiser.means["recon_mse"], rtol=1e-3)


def test_the_default_score_is_the_cards_combination_computed_independently(exported_model, digits):
    device = ops.Direct(VAERuntime(exported_model, options=RuntimeOptions(providers=("CPUExecutionProvider",))))
    result = device.run(ops.score, digits, num_samples=3, seed=5)
    assert result.kind == "excess_mse" and result.warning is None
    statistics = device.card.score_statistics
    base = base_scores(model_outputs(device, digits, num_samples=3, seed=5), "bernoulli", {})
    expected = sum((base[name] - statistics.standardiser.means[name]) / statistics.standardiser.stds[name]
                   for name in ("bernoulli_excess", "recon_mse"))
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6)
    png = device.run(ops.score, digits, num_samples=3, seed=5, kind="png_mse")
    np.testing.assert_allclose(png.scores, statistics.apply(base, "png_mse"), rtol=1e-6)
    # an explicit complexity correction asks for the likelihood; with a combination it is refused
    assert device.run(ops.score, digits, complexity="png").kind == "likelihood"
    with pytest.raises(ValueError, match="complexity='png' applies to kind='likelihood' only"):
        device.run(ops.score, digits, complexity="png", kind="png_mse")


def test_a_model_exported_without_statistics_falls_back_to_the_likelihood_and_says_so(exported_model, digits,
                                                                                       tmp_path):
    old = tmp_path / "old-model"
    shutil.copytree(exported_model, old)
    card = json.loads((old / "model.json").read_text())
    del card["anomaly_score"]
    (old / "model.json").write_text(json.dumps(card))
    device = ops.Direct(VAERuntime(old, options=RuntimeOptions(providers=("CPUExecutionProvider",))))
    result = device.run(ops.score, digits, num_samples=2, seed=1)
    assert result.kind == "likelihood" and "re-export" in result.warning
    np.testing.assert_array_equal(result.scores, device.run(ops.score, digits, 2, seed=1, kind="likelihood").scores)
    with pytest.raises(ValueError, match="score kind 'png_mse' needs statistics this model's card lacks"):
        device.run(ops.score, digits, kind="png_mse")
