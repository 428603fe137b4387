"""Model presets and the ResNet architecture: config resolution, shapes for every likelihood, the
figures --help prints, and that the original net is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from serve.likelihoods import PARAMS_PER_CHANNEL
from tests.conftest import REPO, subprocess_env
from train.config import (ConfigError, ModelConfig, build_config, config_from_dict, config_to_dict, latent_shape,
                          parse_args, stage_sides)
from train.loss import vae_loss
from train.model import ConvVAE, build_model
from train.presets import PRESETS, preset_figures
from train.resnet import ResNetVAE, ResnetBlock, SelfAttention, stage_widths

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned", "discretized_logistic")
TINY = {"widths": "4,8", "hidden_dim": 16, "latent_dim": 3}  # tiny widths: seconds, not minutes
CONV_PARAMETERS = 1_688_289  # the original net at 28x28x1, Bernoulli: the count it had before presets


def _model_config(**fields) -> ModelConfig:
    return build_config({"model": fields, "data": {"dynamic_binarization": "off"}}).model


@pytest.mark.parametrize("fields", [
    {"likelihood": "gaussian", "gaussian_sigma": 0.2, "widths": "4,8", "hidden_dim": 16, "latent_dim": 3},
    {"preset": "resnet-s", "image_size": 16, "channels": 3, "likelihood": "discretized_logistic",
     "latent_kind": "spatial", "latent_channels": 2, "widths": "4,8", "blocks_per_stage": 1}])
def test_save_pretrained_and_from_pretrained_give_the_same_model(tmp_path, fields):
    from train import load_model
    from train.model import VAE

    config = _model_config(**fields)
    torch.manual_seed(0)
    model = build_model(config).eval()
    directory = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    for loaded in (VAE.from_pretrained(directory), type(model).from_pretrained(directory), load_model(directory)):
        assert type(loaded) is type(model) and loaded.config == config and not loaded.training
        x = torch.rand(4, config.channels, config.image_size, config.image_size)
        z = torch.randn(4, config.latent_dim)
        with torch.no_grad():
            for ours, theirs in ((model.encode(x).mean, loaded.encode(x).mean),
                                 (model.encode(x).logvar, loaded.encode(x).logvar), (model.decode(z), loaded.decode(z))):
                assert torch.equal(ours, theirs)
        assert loaded.likelihood.constants() == model.likelihood.constants()
    with pytest.raises(TypeError, match="describes a"):
        (ConvVAE if isinstance(model, ResNetVAE) else ResNetVAE).from_pretrained(directory)

    # what is wrong is named: a config that is not one, weights cut short, a directory without them
    config_file, weights_file = directory / "config.json", directory / "model.safetensors"
    good_config = config_file.read_text()
    config_file.write_text('{"likelihood": "poisson"}')
    with pytest.raises(ValueError, match=r"(?s)config\.json: not a model config .*model\.likelihood"):
        VAE.from_pretrained(directory)
    config_file.write_text(good_config)
    weights_file.write_bytes(weights_file.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"model\.safetensors does not hold the weights"):
        VAE.from_pretrained(directory)
    weights_file.unlink()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VAE.from_pretrained(directory)


def test_conv_preset_is_the_original_net_and_stays_the_default():
    assert build_config({}).model == ModelConfig() == _model_config(preset="conv")
    model = build_model(ModelConfig())
    assert isinstance(model, ConvVAE)
    assert sum(p.numel() for p in model.parameters()) == CONV_PARAMETERS
    # the state-dict layout old checkpoints were saved with
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "decoder_dense", "decoder_conv"}
    assert tuple(model.state_dict()["decoder_conv.2.weight"].shape) == (32, 1, 4, 4)


def test_a_checkpoint_config_from_before_presets_rebuilds_the_conv_net():
    stored = config_to_dict(build_config({"model": {"latent_dim": 8, "widths": [16, 32]}}))
    for key in ("preset", "architecture", "attention", "lowest_resolution"):
        del stored["model"][key]  # fields a checkpoint written before presets does not have
    model_config = config_from_dict(stored).model
    assert model_config.architecture == "conv" and model_config.latent_dim == 8 and model_config.widths == (16, 32)


def test_explicit_flags_override_the_presets_fields(tmp_path):
    config = parse_args(["--model.preset=resnet-m", "--model.latent_dim=7", "--model.widths=8,16",
                         "--model.channels=3", "--model.likelihood=discretized_logistic"])
    preset = PRESETS["resnet-m"].fields
    assert config.model.preset == "resnet-m" and config.model.architecture == "resnet"
    assert config.model.latent_dim == 7 and config.model.widths == (8, 16)  # given: they win
    assert config.model.attention is preset["attention"] and config.model.hidden_dim == preset["hidden_dim"]
    assert config.model.blocks_per_stage == preset["blocks_per_stage"]
    # a preset from a config file, a field from a flag: the flag still wins over the preset
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"preset": "resnet-s", "attention": True}}))
    from_file = parse_args(["--config", str(path), "--model.hidden_dim=64"])
    assert from_file.model.attention is True and from_file.model.hidden_dim == 64
    assert from_file.model.widths == PRESETS["resnet-s"].fields["widths"]
    # the resolved fields round-trip through a checkpoint's config exactly
    assert config_from_dict(config_to_dict(config)) == config


def test_bad_preset_and_resnet_fields_are_reported_together():
    with pytest.raises(ConfigError) as error:
        build_config({"model": {"preset": "resnet-xl", "architecture": "transformer", "lowest_resolution": 0}})
    message = str(error.value)
    assert "model.preset: expected one of conv, resnet-s, resnet-m, resnet-l, got 'resnet-xl'" in message
    assert "model.architecture: expected one of conv, resnet, got 'transformer'" in message
    assert "model.lowest_resolution: must be >= 1, got 0" in message
    with pytest.raises(ConfigError, match="model.widths: expected one or more positive widths"):
        build_config({"model": {"preset": "resnet-s", "widths": [8, 0]}})
    # the conv net's own limits still hold for it, and only for it
    with pytest.raises(ConfigError, match="multiple of 4 for the conv architecture, got 30"):
        build_config({"model": {"image_size": 30}})
    assert build_config({"model": {"preset": "resnet-s", "image_size": 30, "widths": [8, 16, 32]}})


def test_stage_sides_halve_to_a_small_even_side():
    assert stage_sides(28, 4) == [28, 14, 7]  # 7 is odd: no further halving
    assert stage_sides(32, 4) == [32, 16, 8, 4]
    assert stage_sides(64, 4) == [64, 32, 16, 8, 4]
    assert stage_sides(256, 8) == [256, 128, 64, 32, 16, 8]
    assert stage_sides(6, 4) == [6]
    assert stage_widths((32, 64), 4) == [32, 64, 64, 64]


def test_resnet_blocks_and_attention_start_as_identity():
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(ResnetBlock(16)(x), x)
    assert torch.equal(SelfAttention(16)(x), x)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("preset,size,channels,latent_kind", [
    ("resnet-s", 28, 1, "dense"), ("resnet-m", 32, 3, "dense"), ("resnet-l", 64, 3, "dense"),
    ("resnet-s", 28, 1, "spatial"), ("resnet-m", 64, 3, "spatial")])
def test_resnet_presets_for_every_likelihood(preset, size, channels, latent_kind, likelihood):
    tiny = TINY if latent_kind == "dense" else {k: v for k, v in TINY.items() if k != "latent_dim"}
    config = _model_config(preset=preset, image_size=size, channels=channels, likelihood=likelihood,
                           latent_kind=latent_kind, **tiny)
    model = build_model(config)
    assert isinstance(model, ResNetVAE)
    x = (torch.rand(3, channels, size, size) * 255).round() / 255
    params, posterior = model(x)
    assert params.shape == (3, PARAMS_PER_CHANNEL[likelihood] * channels, size, size)
    assert posterior.mean.shape == posterior.logvar.shape == (3, config.latent_dim)
    mean = model.image_mean(params)
    assert mean.shape == x.shape and 0 <= mean.min() and mean.max() <= 1
    terms = vae_loss(params, x, posterior, model.likelihood)
    loss = terms.negative_elbo().mean()
    assert torch.isfinite(loss) and terms.recon.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("size", [128, 256])
def test_resnet_at_128_and_256_px_has_the_right_shapes(size):
    config = _model_config(preset="resnet-l", image_size=size, channels=3, likelihood="discretized_logistic",
                           widths="2,4", hidden_dim=8, latent_dim=2, blocks_per_stage=1)
    model = build_model(config).eval()
    with torch.no_grad():
        posterior = model.encode(torch.rand(1, 3, size, size))
        params = model.decode(posterior.mean)
    assert model.feature_shape == (4, 4, 4) and params.shape == (1, 6, size, size)


def test_conv_flops_match_a_hand_count():
    # 2 x multiply-adds of each convolution and linear layer of the original net at 28x28x1
    hand = 2 * (1 * 32 * 16 * 14 * 14 + 32 * 64 * 16 * 7 * 7 + 64 * 7 * 7 * 256 + 256 * 32    # encoder
                + 16 * 256 + 256 * 64 * 7 * 7 + 64 * 32 * 16 * 7 * 7 + 32 * 1 * 16 * 14 * 14)  # decoder
    assert preset_figures("conv", 28, channels=1, likelihood="bernoulli") == (CONV_PARAMETERS, hand)


def test_stored_figures_are_the_measured_ones():
    from train.presets import FIGURES, measure_figures

    measured = measure_figures()
    assert measured == FIGURES, f"a preset changed: set train.presets.FIGURES = {measured}"
    assert FIGURES["conv"][28][0] == CONV_PARAMETERS


def test_help_lists_every_preset_with_its_figures():
    result = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, preset in PRESETS.items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert f"{preset.sizes[0]}-{preset.sizes[1]} px" in row
    assert any("1.69M" in line and "10.1M" in line for line in lines if line.split()[:1] == ["conv"])
    assert any(line.split() == ["128", "px", "28.4M", "13.4G"] for line in lines)  # resnet-m at 128 px
    assert "--model.preset=conv" in result.stdout


def test_run_names_say_the_preset():
    from train.tracking import readable_run_name

    name = readable_run_name(build_config({"model": {"preset": "resnet-m"}}), 1, "fp32")
    assert name.startswith("bernoulli-resnet-m-z64-32x64x128x256-")
    assert readable_run_name(build_config({}), 1, "fp32").startswith("bernoulli-z16-32x64-bs128-")


def test_a_spatial_latent_is_c_by_s_by_s_flattened_channel_major():
    config = _model_config(preset="resnet-m", image_size=32, channels=3, latent_kind="spatial", latent_channels=4,
                           widths="4,8", likelihood="gaussian")
    assert latent_shape(config) == (4, 4, 4) and config.latent_dim == 64  # resolved from the image size
    assert config_from_dict(config_to_dict(build_config({"model": config.__dict__}))).model == config
    model = build_model(config).eval()
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # no dense layers
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.encoder[:-1](x)                                    # (B, 2C, s, s) before flattening
        posterior = model.encode(x)
        assert maps.shape == (2, 8, 4, 4)
        torch.testing.assert_close(posterior.mean.view(2, 4, 4, 4), maps[:, :4])
        assert model.decode(posterior.mean).shape == (2, 3, 32, 32)
    assert _model_config(preset="resnet-s", image_size=64, latent_kind="spatial", latent_channels=3,
                         lowest_resolution=16).latent_dim == 3 * 16 * 16
    with pytest.raises(ConfigError, match="a spatial latent of 4x7x7 has 196 values, got 5"):
        _model_config(preset="resnet-s", latent_kind="spatial", latent_dim=5)
    with pytest.raises(ConfigError, match="spatial needs model.architecture=resnet, got 'conv'"):
        _model_config(latent_kind="spatial")
