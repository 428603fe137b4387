import pytest

from train.config import ConfigError, config_from_dict, config_to_dict, parse_args


def test_flags_override_defaults():
    config = parse_args(["--data.batch_size=64", "--model.widths=16,32", "--run.precision=fp32"])
    assert config.data.batch_size == 64 and config.model.widths == (16, 32)
    assert config.run.precision == "fp32"


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        parse_args(["--model.image_size=30", "--data.batch_size=abc", "--nope.x=1",
                    "--model.colour=3", "--run.precision=fp8", "positional"])
    message = str(error.value)
    for fragment in ("positional", ):
        assert fragment in message
    with pytest.raises(ConfigError) as error:
        parse_args(["--model.image_size=30", "--data.batch_size=abc", "--nope.x=1",
                    "--model.colour=3", "--run.precision=fp8"])
    message = str(error.value)
    for fragment in ("model.image_size", "data.batch_size", "nope", "model.colour", "run.precision"):
        assert fragment in message


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"latent_dim": 4}, "data": {"batch_size": 16}}')
    config = parse_args(["--config", str(path), "--data.batch_size=8"])
    assert config.model.latent_dim == 4 and config.data.batch_size == 8


def test_round_trip_through_dict():
    config = parse_args(["--model.latent_dim=7"])
    assert config_from_dict(config_to_dict(config)) == config
