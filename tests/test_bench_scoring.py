"""The scoring the likelihood benchmarks share (bench/bits_per_dim.py, bench/lossless_codecs.py) and the
checkpoints bench/fmnist_quality.py picks for its curve: fast checks on real tiny models and images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bits_per_dim import FixedScaleLogistic, fit_log_scale, iwae_nats, peer_net  # noqa: E402
from fmnist_quality import curve_points  # noqa: E402
from lossless_codecs import codec_bits_per_dim  # noqa: E402

from train.likelihood import discretized_logistic_nll  # noqa: E402


def test_codecs_find_no_information_in_flat_images_and_none_to_spare_in_noise():
    flat = np.zeros((5, 28, 28, 1), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    assert codec_bits_per_dim(flat)["xz_whole_set"] < 0.5
    assert all(bits > 7.9 for bits in codec_bits_per_dim(noise).values())


def test_a_peer_is_scored_as_a_logistic_around_its_mean_with_the_best_single_scale():
    torch.manual_seed(0)
    net = peer_net({"image_size": 8, "widths": [4, 8], "hidden_dim": 16, "latent_dim": 2}).eval()
    x = torch.randint(0, 256, (40, 1, 8, 8)).float() / 255

    def mean_decoder(z):
        return torch.sigmoid(net.decode(z))

    log_scale = fit_log_scale(net, mean_decoder, x)
    model = FixedScaleLogistic(net, mean_decoder, log_scale)
    params = model.decode(net.encode(x).mean)
    assert params.shape == (40, 2, 8, 8) and torch.all(params[:, 1] == log_scale)
    mean = mean_decoder(net.encode(x).mean)
    nll = {s: discretized_logistic_nll(mean, torch.full_like(mean, s), x).mean().item()
           for s in (log_scale - 0.5, log_scale, log_scale + 0.5)}
    assert nll[log_scale] < min(nll[log_scale - 0.5], nll[log_scale + 0.5])  # a fit, not a default
    bits_per_pixel = iwae_nats(model, x[:4], k=3) / (64 * np.log(2))
    # uniform noise: nothing beats 8 bits a pixel; a fitted scale comes close, the unfitted e^0 costs about 10
    assert 7.5 < bits_per_pixel < 9.0


def test_the_curve_takes_the_first_checkpoint_past_each_mark_and_the_last():
    found = [(t, i, Path(f"c{i}")) for i, t in enumerate([40.0, 130.0, 170.0, 250.0, 290.0, 650.0, 700.0])]
    chosen = curve_points(found, every_s=100.0)
    assert [t for t, _, _ in chosen] == [130.0, 250.0, 650.0, 700.0]
