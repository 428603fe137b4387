"""Likelihoods, IWAE, free bits, schedules and model shapes against independent references;
short in-process runs for bf16/fp32, EMA, limits and the non-finite guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from train.config import ConfigError, ModelConfig, build_config
from train.distributed import DistContext
from train.evaluate import iwae_log_likelihood
from serve.likelihoods import PARAMS_PER_CHANNEL
from train.likelihood import Gaussian, LearnedGaussian, discretized_logistic_nll
from train.loss import training_objective, vae_loss
from train.model import DiagonalGaussian, build_model

CPU = DistContext(0, 1, 0, torch.device("cpu"), "gloo")


def test_gaussian_likelihoods_match_torch_normal():
    torch.manual_seed(0)
    x, mean, log_sigma = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 0.5 - 2
    fixed = Gaussian(sigma=0.1).nll(mean, x)
    torch.testing.assert_close(fixed, -Normal(mean, 0.1).log_prob(x).flatten(1).sum(1), rtol=1e-5, atol=1e-3)
    learned = LearnedGaussian().nll(torch.cat([mean, log_sigma], 1), x)
    reference = -Normal(mean, log_sigma.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(learned, reference, rtol=1e-5, atol=1e-3)


def test_discretized_logistic_is_a_distribution_over_the_256_levels():
    x = (torch.arange(256, dtype=torch.float64) / 255).view(256, 1, 1, 1)
    for mean, log_scale in ((0.3, -3.0), (0.0, -6.5), (1.02, -1.0), (0.5, 2.0), (0.7, -7.0)):
        nll = discretized_logistic_nll(torch.full_like(x, mean), torch.full_like(x, log_scale), x)
        total = torch.exp(-nll.double()).sum().item()
        assert abs(total - 1.0) < 2e-3, (mean, log_scale, total)
        # each level against the logistic CDF in float64, written out
        cdf = lambda v: torch.sigmoid((v - mean) / math.exp(log_scale))  # noqa: E731
        upper = torch.where(x >= 1 - 1e-9, torch.ones_like(x), cdf(x + 0.5 / 255))
        lower = torch.where(x <= 1e-9, torch.zeros_like(x), cdf(x - 0.5 / 255))
        reference = -torch.log((upper - lower).clamp_min(1e-300)).flatten()
        finite = reference < 9  # where the mass is not tiny the two formulas agree closely
        torch.testing.assert_close(nll.double()[finite], reference[finite], rtol=1e-3, atol=2e-3)
        assert torch.isfinite(nll).all()


def test_iwae_converges_to_the_exact_marginal_likelihood():
    # one latent dimension: log p(x) = log integral p(x|z) N(z; 0, 1) dz by quadrature, independently
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=4, latent_dim=1, widths=(2, 2), hidden_dim=8)).eval()
    x = (torch.rand(3, 1, 4, 4) > 0.5).float()
    with torch.no_grad():
        z = torch.linspace(-10, 10, 20001)[:, None]
        params = model.decode(z)
        exact = torch.stack([
            torch.logsumexp(-model.likelihood.nll(params, x[i:i + 1].expand(len(z), -1, -1, -1)).double()
                            - 0.5 * (z[:, 0].double() ** 2 + math.log(2 * math.pi)), 0) + math.log(20 / 20000)
            for i in range(3)])
    estimate = iwae_log_likelihood(model, x, num_samples=4000, chunk=333, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate, exact, atol=0.03, rtol=0)
    # K = 1 is the ELBO: on average a looser (lower) bound than K = 4000
    single = torch.stack([iwae_log_likelihood(model, x, num_samples=1, chunk=1,
                                              generator=torch.Generator().manual_seed(s)) for s in range(300)])
    assert (single.mean(0) < estimate - 0.01).all()


def test_free_bits_floor_each_units_kl_and_stop_its_gradient():
    mean = torch.tensor([[0.01, 2.0], [0.02, -1.0]], requires_grad=True)
    posterior = DiagonalGaussian(mean, torch.zeros(2, 2))
    terms = vae_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), posterior)
    loss = training_objective(terms, posterior, beta=1.0, free_bits=0.5)
    per_unit = 0.5 * mean.detach().pow(2).mean(0)  # KL per unit with unit variance: mean^2 / 2
    expected = terms.recon.mean() + per_unit.clamp_min(0.5).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.all(mean.grad[:, 0] == 0) and torch.all(mean.grad[:, 1] != 0)
    no_floor = training_objective(terms, posterior, beta=0.5, free_bits=0.0)
    torch.testing.assert_close(no_floor, (terms.recon + 0.5 * terms.kl).mean())


def test_schedules():
    from train.trainer import kl_weight, lr_factor

    config = build_config({"optim": {"warmup_steps": 10, "kl_warmup_steps": 100, "beta": 2.0,
                                     "min_lr_ratio": 0.1}})
    assert lr_factor(0, 0.0, config) == pytest.approx(0.1) and lr_factor(9, 0.0, config) == 1.0
    assert lr_factor(50, 0.0, config) == 1.0 and lr_factor(50, 0.5, config) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, config) == pytest.approx(0.1)
    assert kl_weight(0, config) == pytest.approx(0.02) and kl_weight(49, config) == pytest.approx(1.0)
    assert kl_weight(500, config) == 2.0


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned", "discretized_logistic"])
@pytest.mark.parametrize("size,channels,residual", [(12, 1, False), (32, 3, True)])
def test_model_shapes_for_every_likelihood(likelihood, size, channels, residual):
    config = ModelConfig(image_size=size, channels=channels, latent_dim=5, widths=(8, 16), hidden_dim=32,
                         blocks_per_stage=1, residual=residual, likelihood=likelihood)
    model = build_model(config)
    x = torch.rand(3, channels, size, size)
    params, posterior = model(x)
    assert params.shape == (3, PARAMS_PER_CHANNEL[likelihood] * channels, size, size)
    assert posterior.mean.shape == (3, 5)
    mean = model.image_mean(params)
    assert mean.shape == x.shape and mean.min() >= 0 and mean.max() <= 1
    terms = vae_loss(params, x, posterior, model.likelihood)
    assert torch.isfinite(terms.recon).all() and terms.recon.dtype == torch.float32


def test_deeper_and_residual_models_have_more_layers_and_start_as_identity():
    plain = build_model(ModelConfig())
    deep = build_model(ModelConfig(blocks_per_stage=2, residual=True))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(deep) > count(plain)
    block = deep.encoder[2]
    x = torch.randn(2, 32, 14, 14)
    assert torch.equal(block(x), x)  # zero-initialised last convolution


def test_bad_configs_are_reported_together():
    with pytest.raises(ConfigError) as error:
        build_config({"model": {"likelihood": "poisson", "widths": [8]},
                      "data": {"dynamic_binarization": True},
                      "run": {"max_steps": 0, "precision": "fp8"}, "optim": {"ema_decay": 1.5}})
    for fragment in ("model.likelihood", "model.widths", "run.max_steps, run.max_epochs", "run.precision",
                     "optim.ema_decay"):
        assert fragment in str(error.value)


def _config(shards, tmp_path, **overrides):
    sections = {
        "data": {"shards": str(shards), "batch_size": 32, "num_workers": 0, "eval_batch_size": 120},
        "model": {"widths": [8, 16], "hidden_dim": 32, "latent_dim": 4},
        "optim": {"warmup_steps": 2, "ema_decay": 0.9, "lr": 1e-2},
        "run": {"out_dir": str(tmp_path / "run"), "max_steps": 25, "eval_interval_steps": 1000,
                "log_interval_steps": 5, "final_iwae_samples": 5, "system_metrics": False,
                "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        sections[section][name] = value
    return build_config(sections)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_and_fp32_both_train_and_the_ema_differs(small_shards, tmp_path, precision):
    import json

    from train import load_checkpoint, load_model
    from train.trainer import run_training

    summary = run_training(_config(small_shards, tmp_path, run__precision=precision,
                                   data__dynamic_binarization=True), CPU)
    assert summary["precision"] == precision and summary["steps"] == 25
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train/neg_elbo"] for r in history if "train/neg_elbo" in r]
    assert train_losses[-1] < train_losses[0] - 30, train_losses  # from ~540 nats (784 ln 2) untrained
    assert summary["val/nll"] <= summary["val/neg_elbo"] + 1.0  # IWAE bound (K=5) vs one-sample ELBO
    model, state = load_model(tmp_path / "run"), load_checkpoint(tmp_path / "run")
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())  # load_model gives the EMA
    pretrained = load_model(tmp_path / "run" / "model")  # the finished run's save_pretrained directory
    assert all(torch.equal(v, state["ema"][k]) for k, v in pretrained.state_dict().items())


def test_epoch_and_time_limits_and_the_non_finite_guard(small_shards, tmp_path):
    from train.trainer import run_training

    # 1,080 images / 32 = 33 batches per epoch: half an epoch is 17 steps
    summary = run_training(_config(small_shards, tmp_path / "a", run__max_steps=0, run__max_epochs=0.5,
                                   run__final_iwae_samples=0), CPU)
    assert summary["steps"] == 17 and summary["stopped_by"] == "steps"
    summary = run_training(_config(small_shards, tmp_path / "b", run__max_steps=0, run__max_time_s=1.0,
                                   run__final_iwae_samples=0), CPU)
    assert summary["stopped_by"] == "time" and summary["steps"] > 0
    with pytest.raises(FloatingPointError, match=r"3 steps in a row, the last at step \d+"):
        run_training(_config(small_shards, tmp_path / "c", optim__lr=1e30, optim__grad_clip=0.0,
                             run__max_consecutive_skips=3, run__precision="fp32"), CPU)


def test_precision_resolution():
    from train.precision import make_grad_scaler, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")  # bf16 only with native CPU support
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    assert not make_grad_scaler("bf16", cpu).is_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_with_grad_scaler_trains_on_cuda(small_shards, tmp_path):
    from train import load_checkpoint
    from train.trainer import run_training

    context = DistContext(0, 1, 0, torch.device("cuda", 0), "nccl")
    summary = run_training(_config(small_shards, tmp_path, run__precision="fp16"), context)
    assert summary["precision"] == "fp16" and summary["steps"] == 25
    state = load_checkpoint(tmp_path / "run")
    assert state["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed
