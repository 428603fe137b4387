import dataclasses

import pytest

from train.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, parse_args


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


def test_yaml_file_then_flags_in_either_form(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: resnet-s\n  widths: [8, 16, 32]\ndata:\n  batch_size: 16\n"
                    "  dynamic_binarization: off\nrun:\n  precision: fp32\n")  # YAML's off is a boolean
    config = parse_args([f"--config={path}", "--data.batch_size", "8", "--run.max_steps", "7",
                         "--model.latent_dim=12"])
    assert config.data.batch_size == 8 and config.run.max_steps == 7 and config.model.latent_dim == 12
    assert config.model.widths == (8, 16, 32) and config.model.architecture == "resnet"  # file over preset
    assert config.data.dynamic_binarization == "off" and config.run.precision == "fp32"


def test_a_bad_config_file_is_named_with_every_problem_in_it(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  latent_dim: [4\n")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"model": {"colour": 3, "likelihood": "poisson"}, "data": {"batch_size": "abc"}}')
    with pytest.raises(ConfigError) as error:
        parse_args(["--config", str(broken), "--config", str(wrong), "--config", str(tmp_path / "gone.yaml")])
    lines = str(error.value).splitlines()[1:]
    assert [line.split(": ", 1)[0].strip() for line in lines] == [
        f"config file {broken}", *[f"config file {wrong}"] * 3, f"config file {tmp_path / 'gone.yaml'}"]
    for fragment in ("line 2", "colour", "poisson", "data.batch_size", "No such file"):
        assert fragment in str(error.value)


def test_config_without_a_file_is_a_usage_error():
    with pytest.raises(ConfigError, match="--config: .*expected one argument"):
        parse_args(["--data.batch_size=8", "--config"])


def test_print_config_prints_what_config_reads_back(tmp_path, capsys):
    from train.__main__ import main

    flags = ["--model.preset=resnet-s", "--model.latent_dim", "24", "--data.dynamic_binarization=on",
             "--run.max_steps=9"]
    assert main([*flags, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "preset: resnet-s" in printed and "widths: [32, 64, 128]" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    assert parse_args(["--config", str(tmp_path / "printed.yaml")]) == parse_args(flags)


def test_every_flag_as_help_prints_it_is_accepted(capsys):
    """--help shows each flag as --section.field=DEFAULT; given back exactly so, each gives its default."""
    import re

    from train.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    flags = re.findall(r"^  (--[a-z_]+\.[a-z_]+=\S*)", help_text, flags=re.MULTILINE)
    assert len(flags) == sum(len(dataclasses.fields(s.default_factory)) for s in dataclasses.fields(TrainConfig))
    assert "--model.widths=32,64" in flags
    assert parse_args(flags) == parse_args([])
    # a docstring's whole text, not its first line; a Literal field's choices are enforced
    assert "(on for a 1-channel bernoulli model)" in " ".join(help_text.split())
    with pytest.raises(ConfigError, match="discretized_logistic"):
        parse_args(["--model.likelihood=poisson"])


def test_configs_stored_by_older_versions_still_load():
    stored = config_to_dict(parse_args([]))
    stored["data"]["dynamic_binarization"] = "true"  # the old parser's spelling of on
    stored["model"]["widths"] = [16, 32]
    stored["run"].pop("log_all_ranks")  # fields added since take their defaults
    config = config_from_dict(stored)
    assert config.data.dynamic_binarization == "on" and config.model.widths == (16, 32)
