"""One typed config: defaults in code <- optional JSON file <- `--section.field=value` flags.

Every problem (unknown key, wrong type, bad value) is collected and raised once.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.foreign import check_image_key, check_label_key
from train.presets import apply_preset

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned", "discretized_logistic")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ARCHITECTURES = ("conv", "resnet")
LATENT_KINDS = ("dense", "spatial")


@dataclass(frozen=True)
class DataConfig:
    shards: str = "out/shards"
    """Directory or URL prefix (s3://, gs://, https://) with manifest.json, a manifest .json path, or a shard pattern."""
    batch_size: int = 128
    """Images per batch on each rank (global batch = batch_size x world size)."""
    num_workers: int = 1
    """Loader worker processes per rank (0 reads in the training process)."""
    dynamic_binarization: str = "auto"
    """Train on x ~ Bernoulli(pixel) drawn afresh each batch, val binarised once with a fixed seed:
    'on', 'off', or 'auto' (on for a 1-channel bernoulli model)."""
    eval_batch_size: int = 256
    """Images per evaluation batch on each rank."""
    image_key: str = "auto"
    """Foreign shard sets: the image member (jpg, png, webp, ...); auto takes the first of jpg/jpeg/png/webp/ppm/npy."""
    label_key: str = "auto"
    """Foreign shard sets: the label, cls, txt, json:FIELD or none; auto reads cls when present."""
    samples_per_epoch: int = 0
    """> 0: approximate epochs of this many samples, shards drawn with replacement, no manifest needed."""
    val_shards: str = ""
    """Validation shards when they are elsewhere ('' : the manifest's val split; without one, the last shard)."""
    max_bad_samples: int = 100
    """Error budget per rank: bad samples (undecodable, unlabelled, in a vanished shard) skipped before stopping."""
    max_bad_fraction: float = 0.001
    """Beyond max_bad_samples, the share of samples read that may be bad."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "conv"
    """Named defaults for the other model fields (conv, resnet-s, resnet-m, resnet-l; --help lists them); explicit flags win."""
    architecture: str = "conv"
    """conv (two stride-2 convolutions, for digits) or resnet (GroupNorm residual stages, scales with size)."""
    image_size: int = 28
    """Height and width of the (square) images; conv: a multiple of 4."""
    channels: int = 1
    """Image channels: 1 (grey) or 3 (RGB)."""
    latent_dim: int = 16
    """Size of z (a spatial latent: latent_channels x s x s, worked out from the image size)."""
    latent_kind: str = "dense"
    """resnet: dense (a vector through dense layers) or spatial (C x s x s at the lowest resolution, no dense layers)."""
    latent_channels: int = 4
    """resnet with a spatial latent: its channels C."""
    widths: tuple[int, ...] = (32, 64)
    """conv: channels of the two stride-2 convolutions; resnet: channels per stage from full size down (the last repeats)."""
    hidden_dim: int = 256
    """Width of the dense layer between the convolutions and the latent."""
    blocks_per_stage: int = 0
    """conv: extra 3x3 conv blocks at each resolution; resnet: residual blocks per stage (encoder and decoder)."""
    residual: bool = False
    """conv: make those extra blocks residual (x + conv(act(conv(act(x)))))."""
    attention: bool = False
    """resnet: self-attention at the lowest resolution (in encoder and decoder)."""
    lowest_resolution: int = 4
    """resnet: halve the side while it stays even and at least this (28 -> 14 -> 7, 64 -> ... -> 4)."""
    likelihood: str = "bernoulli"
    """p(x|z): bernoulli, gaussian (fixed sigma), gaussian_learned, discretized_logistic (8-bit)."""
    gaussian_sigma: float = 0.1
    """Standard deviation of the fixed-variance Gaussian likelihood (pixels in [0, 1])."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """The cosine decays to this fraction of the peak learning rate."""
    grad_clip: float = 5.0
    """Clip the global gradient norm to this (0 turns it off)."""
    beta: float = 1.0
    """Weight of the KL term (1 is the true ELBO; beta-VAE otherwise)."""
    kl_warmup_steps: int = 0
    """Ramp the KL weight linearly from 0 to beta over this many steps (0: no warm-up)."""
    free_bits: float = 0.0
    """Free bits: nats per latent unit below which the batch-mean KL is not penalised (0: off)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights used for evaluation and export (0: off)."""


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "out/run"
    """Where checkpoints go (a directory per step under checkpoints/), plus metrics.jsonl."""
    max_steps: int = 2000
    """Stop after this many optimizer steps (0: no step limit)."""
    max_epochs: float = 0.0
    """Stop after this many epochs of the training split (0: no epoch limit)."""
    max_time_s: float = 0.0
    """Stop after this many seconds of training, summed over restarts (0: no time limit)."""
    eval_interval_steps: int = 250
    """Validate (and log images) every this many steps, and at the end."""
    log_interval_steps: int = 25
    """Log training and system metrics every this many steps."""
    checkpoint_interval_steps: int = 500
    """Save a checkpoint every this many steps, and at the end."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints (at least 2)."""
    iwae_samples: int = 0
    """Importance samples K for the IWAE NLL at periodic evaluations (0: skip; ELBO only)."""
    final_iwae_samples: int = 100
    """Importance samples K for the IWAE NLL at the final evaluation (0: skip)."""
    iwae_chunk: int = 50
    """Importance samples decoded per pass (memory bound: chunk x eval_batch_size decodes)."""
    precision: str = "auto"
    """'auto' (bf16 where native), 'bf16', 'fp16' (CUDA only, with GradScaler) or 'fp32'."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    max_consecutive_skips: int = 20
    """Stop with an error after this many non-finite steps in a row."""
    seed: int = 0
    """Seed for weights, noise and data order."""
    tracking_uri: str = ""
    """MLflow tracking URI ('' means $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/../mlflow.db)."""
    experiment: str = "vae-pipeline"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name ('' derives a readable one from the config)."""
    system_metrics: bool = True
    """Log system/ metrics (CPU, memory, GPU memory) with the training metrics."""
    tracking_flush_timeout_s: float = 60.0
    """At the end, wait this long for an unreachable tracking server before saving unsent metrics to disk."""


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
            if not isinstance(value, (bool, int)):
                raise TypeError(value)
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return None


BINARIZATION_CHOICES = ("auto", "on", "off", "true", "false", "1", "0")


def binarizes(config: TrainConfig) -> bool:
    """Whether training binarises inputs dynamically (and evaluation binarises once, seeded)."""
    choice = str(config.data.dynamic_binarization).lower()
    if choice == "auto":
        return config.model.likelihood == "bernoulli" and config.model.channels == 1
    return choice in ("on", "true", "1")


def _validate(config: TrainConfig) -> list[str]:
    problems = []
    model, data, run, optim = config.model, config.data, config.run, config.optim
    if model.architecture not in ARCHITECTURES:
        problems.append(f"model.architecture: expected one of {', '.join(ARCHITECTURES)}, got {model.architecture!r}")
    if model.architecture == "conv" and (model.image_size % 4 or model.image_size < 4):
        problems.append(f"model.image_size: must be a positive multiple of 4 for the conv architecture, "
                        f"got {model.image_size}")
    if model.architecture == "resnet" and model.image_size < 1:
        problems.append(f"model.image_size: must be >= 1, got {model.image_size}")
    if model.channels not in (1, 3):
        problems.append(f"model.channels: must be 1 or 3, got {model.channels}")
    if model.likelihood not in LIKELIHOODS:
        problems.append(f"model.likelihood: expected one of {', '.join(LIKELIHOODS)}, got {model.likelihood!r}")
    if model.architecture == "conv" and (len(model.widths) != 2 or min(model.widths, default=0) < 1):
        problems.append(f"model.widths: expected two positive widths for the conv architecture, got {model.widths}")
    if model.architecture == "resnet" and (not model.widths or min(model.widths) < 1):
        problems.append(f"model.widths: expected one or more positive widths, got {model.widths}")
    if model.latent_kind not in LATENT_KINDS:
        problems.append(f"model.latent_kind: expected one of {', '.join(LATENT_KINDS)}, got {model.latent_kind!r}")
    elif model.latent_kind == "spatial" and model.architecture != "resnet":
        problems.append(f"model.latent_kind: spatial needs model.architecture=resnet, got {model.architecture!r}")
    if model.gaussian_sigma <= 0:
        problems.append(f"model.gaussian_sigma: must be > 0, got {model.gaussian_sigma}")
    for check, value in ((check_image_key, data.image_key), (check_label_key, data.label_key)):
        try:
            check(value)
        except ValueError as error:
            problems.append(f"data.{check.__name__.removeprefix('check_')}: {error}")
    if data.max_bad_samples < 0 or not 0 <= data.max_bad_fraction <= 1:
        problems.append(f"data.max_bad_samples, data.max_bad_fraction: need >= 0 and a fraction in [0, 1], "
                        f"got {data.max_bad_samples}, {data.max_bad_fraction}")
    if data.samples_per_epoch < 0:
        problems.append(f"data.samples_per_epoch: must be >= 0, got {data.samples_per_epoch}")
    if str(data.dynamic_binarization).lower() not in BINARIZATION_CHOICES:
        problems.append(f"data.dynamic_binarization: expected auto, on or off, got {data.dynamic_binarization!r}")
    elif binarizes(config) and model.likelihood != "bernoulli":
        problems.append(f"data.dynamic_binarization: needs model.likelihood=bernoulli, got {model.likelihood!r}")
    for name, value in (("model.latent_dim", model.latent_dim), ("model.hidden_dim", model.hidden_dim),
                        ("model.lowest_resolution", model.lowest_resolution),
                        ("model.latent_channels", model.latent_channels),
                        ("data.batch_size", data.batch_size), ("data.eval_batch_size", data.eval_batch_size),
                        ("run.eval_interval_steps", run.eval_interval_steps),
                        ("run.log_interval_steps", run.log_interval_steps),
                        ("run.checkpoint_interval_steps", run.checkpoint_interval_steps),
                        ("run.iwae_chunk", run.iwae_chunk),
                        ("run.max_consecutive_skips", run.max_consecutive_skips)):
        if value < 1:
            problems.append(f"{name}: must be >= 1, got {value}")
    for name, value in (("model.blocks_per_stage", model.blocks_per_stage), ("data.num_workers", data.num_workers),
                        ("run.max_steps", run.max_steps), ("run.max_epochs", run.max_epochs),
                        ("run.max_time_s", run.max_time_s), ("run.iwae_samples", run.iwae_samples),
                        ("run.final_iwae_samples", run.final_iwae_samples),
                        ("optim.warmup_steps", optim.warmup_steps), ("optim.kl_warmup_steps", optim.kl_warmup_steps),
                        ("optim.free_bits", optim.free_bits), ("optim.beta", optim.beta),
                        ("optim.weight_decay", optim.weight_decay), ("optim.grad_clip", optim.grad_clip)):
        if value < 0:
            problems.append(f"{name}: must be >= 0, got {value}")
    if run.max_steps == 0 and run.max_epochs == 0 and run.max_time_s == 0:
        problems.append("run.max_steps, run.max_epochs, run.max_time_s: give at least one limit (all are 0)")
    if run.keep_checkpoints < 2:
        problems.append(f"run.keep_checkpoints: must be >= 2, got {run.keep_checkpoints}")
    if run.precision not in PRECISIONS:
        problems.append(f"run.precision: expected one of {', '.join(PRECISIONS)}, got {run.precision!r}")
    if optim.lr <= 0:
        problems.append(f"optim.lr: must be > 0, got {optim.lr}")
    if not 0 <= optim.ema_decay < 1:
        problems.append(f"optim.ema_decay: must be in [0, 1), got {optim.ema_decay}")
    if not 0 <= optim.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio: must be in [0, 1], got {optim.min_lr_ratio}")
    return problems


def stage_sides(image_size: int, lowest_resolution: int) -> list[int]:
    """Side of the feature map at each stage: halve while the side stays even and >= lowest_resolution.

    28 -> [28, 14, 7] (7 is odd), 64 with 4 -> [64, 32, 16, 8, 4]. Even sides only, so every
    down-sampling is undone exactly by a x2 up-sampling.
    """
    sides = [image_size]
    while sides[-1] % 2 == 0 and sides[-1] // 2 >= lowest_resolution:
        sides.append(sides[-1] // 2)
    return sides


def latent_shape(model: ModelConfig) -> tuple[int, ...]:
    """(latent_dim,) for a dense latent; (C, s, s) for a spatial one. z always travels flattened
    (B, latent_dim), channel-major, so this is what to reshape it to for spatial use."""
    if model.latent_kind == "spatial" and model.architecture == "resnet":
        side = stage_sides(model.image_size, model.lowest_resolution)[-1]
        return (model.latent_channels, side, side)
    return (model.latent_dim,)


def _resolve_spatial_latent(model: ModelConfig, given: dict, problems: list[str]) -> ModelConfig:
    """A spatial latent's size follows from the image size: set latent_dim to C x s x s
    (`given`: the model fields given explicitly, not those a preset filled in).

    Every consumer of the config (evaluation, export metadata, serve) reads latent_dim as the size
    of the flattened z, so it is resolved here once; an explicit latent_dim that disagrees is an error.
    """
    if model.latent_kind != "spatial" or model.architecture != "resnet" or model.image_size < 1 \
            or model.lowest_resolution < 1:
        return model
    channels, side, _ = latent_shape(model)
    size = channels * side * side
    explicit = given.get("latent_dim")
    if explicit is not None and str(explicit) != str(size):
        problems.append(f"model.latent_dim: a spatial latent of {channels}x{side}x{side} has {size} values, "
                        f"got {explicit} (leave latent_dim out; set latent_channels or lowest_resolution)")
    return dataclasses.replace(model, latent_dim=size)


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
        given = dict(overrides.get(section.name) or {})
        if section.name == "model":  # a preset fills in the model fields not given explicitly
            given = apply_preset(given, problems)
        for key, value in given.items():
            if key not in known:
                problems.append(f"{section.name}.{key}: unknown field; expected one of {sorted(known)}")
                continue
            coerced = _coerce(value, hints[key], f"{section.name}.{key}", problems)
            if coerced is not None:
                values[key] = coerced
        sections[section.name] = section_type(**values)
        if section.name == "model":
            sections["model"] = _resolve_spatial_latent(sections["model"], overrides.get("model") or {}, problems)
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
