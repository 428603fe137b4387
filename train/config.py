"""One typed config: defaults in code <- optional JSON file <- `--section.field=value` flags.

Every problem (unknown key, wrong type, bad value) is collected and raised once.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DataConfig:
    shards: str = "out/shards"
    """Directory (or URL prefix) holding manifest.json and the train/val shards."""
    batch_size: int = 128
    """Images per batch on each rank (global batch = batch_size x world size)."""
    num_workers: int = 1
    """Loader worker processes per rank (0 reads in the training process)."""


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 28
    """Height and width of the (square) images; a multiple of 4."""
    channels: int = 1
    """Image channels: 1 (grey) or 3 (RGB)."""
    latent_dim: int = 16
    """Size of z."""
    widths: tuple[int, ...] = (32, 64)
    """Channels of the two stride-2 convolutions (the decoder mirrors them)."""
    hidden_dim: int = 256
    """Width of the dense layer between the convolutions and the latent."""
    likelihood: str = "bernoulli"
    """p(x|z): 'bernoulli' (cross-entropy on logits)."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    """Peak learning rate (Adam)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    grad_clip: float = 5.0
    """Clip the global gradient norm to this (0 turns it off)."""
    beta: float = 1.0
    """Weight of the KL term (1 is the true ELBO)."""


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "out/run"
    """Where checkpoints go (a directory per step under checkpoints/)."""
    max_steps: int = 2000
    """Stop after this many optimizer steps."""
    max_time_s: float = 0.0
    """Also stop after this many seconds of training (0: no time limit)."""
    eval_interval_steps: int = 250
    """Validate (and log images) every this many steps, and at the end."""
    log_interval_steps: int = 25
    """Log training metrics every this many steps."""
    checkpoint_interval_steps: int = 500
    """Save a checkpoint every this many steps, and at the end."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints (at least 2)."""
    precision: str = "auto"
    """'auto' (bf16 where the device supports it), 'bf16' or 'fp32'."""
    seed: int = 0
    """Seed for weights, noise and data order."""
    tracking_uri: str = ""
    """MLflow tracking URI ('' means $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/../mlflow.db)."""
    experiment: str = "vae-pipeline"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name ('' lets MLflow choose)."""


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """Every problem with a config, listed together."""


def _coerce(value, annotation, where: str, problems: list[str]):
    kind = typing.get_origin(annotation) or annotation
    try:
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(item) for item in items)
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return None


def _validate(config: TrainConfig) -> list[str]:
    problems = []
    model, data, run, optim = config.model, config.data, config.run, config.optim
    if model.image_size % 4 or model.image_size < 4:
        problems.append(f"model.image_size: must be a positive multiple of 4, got {model.image_size}")
    if model.channels not in (1, 3):
        problems.append(f"model.channels: must be 1 or 3, got {model.channels}")
    if model.likelihood not in ("bernoulli",):
        problems.append(f"model.likelihood: expected 'bernoulli', got {model.likelihood!r}")
    if len(model.widths) != 2:
        problems.append(f"model.widths: expected two widths, got {model.widths}")
    for name, value in (("model.latent_dim", model.latent_dim), ("data.batch_size", data.batch_size),
                        ("run.max_steps", run.max_steps), ("run.eval_interval_steps", run.eval_interval_steps),
                        ("run.log_interval_steps", run.log_interval_steps),
                        ("run.checkpoint_interval_steps", run.checkpoint_interval_steps)):
        if value < 1:
            problems.append(f"{name}: must be >= 1, got {value}")
    if data.num_workers < 0:
        problems.append(f"data.num_workers: must be >= 0, got {data.num_workers}")
    if run.keep_checkpoints < 2:
        problems.append(f"run.keep_checkpoints: must be >= 2, got {run.keep_checkpoints}")
    if run.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"run.precision: expected auto, bf16 or fp32, got {run.precision!r}")
    if optim.lr <= 0:
        problems.append(f"optim.lr: must be > 0, got {optim.lr}")
    return problems


def build_config(overrides: dict[str, dict[str, object]] | None = None) -> TrainConfig:
    """A TrainConfig from {section: {field: value}}; raises ConfigError listing every problem."""
    overrides = overrides or {}
    problems: list[str] = []
    sections = {}
    for section in dataclasses.fields(TrainConfig):
        section_type = section.default_factory
        known = {f.name: f for f in dataclasses.fields(section_type)}
        hints = typing.get_type_hints(section_type)
        values = {}
        for key, value in (overrides.get(section.name) or {}).items():
            if key not in known:
                problems.append(f"{section.name}.{key}: unknown field; expected one of {sorted(known)}")
                continue
            coerced = _coerce(value, hints[key], f"{section.name}.{key}", problems)
            if coerced is not None:
                values[key] = coerced
        sections[section.name] = section_type(**values)
    for section in overrides:
        if section not in sections:
            problems.append(f"{section}: unknown section; expected one of {sorted(sections)}")
    config = TrainConfig(**sections)
    problems += _validate(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def parse_args(argv: list[str]) -> TrainConfig:
    """`[--config FILE.json] [--section.field=value ...]` to a validated TrainConfig."""
    overrides: dict[str, dict[str, object]] = {}
    problems = []
    args = list(argv)
    if "--config" in args:
        index = args.index("--config")
        path = Path(args[index + 1])
        for section, values in json.loads(path.read_text()).items():
            overrides.setdefault(section, {}).update(values)
        del args[index : index + 2]
    for arg in args:
        name, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or "." not in name:
            problems.append(f"{arg!r}: expected --section.field=value")
            continue
        section, key = name.split(".", 1)
        overrides.setdefault(section, {})[key] = value
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    return build_config(overrides)


def config_to_dict(config: TrainConfig) -> dict:
    """Nested plain dict (tuples as lists): for JSON, checkpoints and MLflow params."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(data: dict) -> TrainConfig:
    """Inverse of config_to_dict."""
    return build_config(data)


def flat_params(config: TrainConfig) -> dict[str, str]:
    """`section.field` -> value strings, the form MLflow params take."""
    return {f"{section}.{key}": str(value)
            for section, values in config_to_dict(config).items() for key, value in values.items()}


def help_text() -> str:
    """Every field with its default and docstring, for --help."""
    import inspect

    lines = ["Config flags (--section.field=value), defaults shown:"]
    for section in dataclasses.fields(TrainConfig):
        section_type = section.default_factory
        source = inspect.getsource(section_type)
        instance = section_type()
        for f in dataclasses.fields(section_type):
            doc = ""
            marker = f"    {f.name}:"
            if marker in source:
                after = source.split(marker, 1)[1].split("\n", 2)
                if len(after) > 1 and '"""' in after[1]:
                    doc = after[1].strip().strip('"')
            flag = f"--{section.name}.{f.name}={getattr(instance, f.name)}"
            lines.append(f"  {flag:<40} {doc}")
    return "\n".join(lines)
