"""One typed config: defaults in code <- config files (YAML or JSON) <- `--section.field value` flags.

jsonargparse reads the command line and config files over these dataclasses (a field's docstring is
its help, a Literal field's help lists its choices); build_config then fills in the model preset and
checks what types cannot say. Every problem (unknown key, wrong type, bad value) is collected and
raised once, as one ConfigError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import Literal

from pipeline.foreign import check_image_key, check_label_key
from train.presets import apply_preset

Likelihood = Literal["bernoulli", "gaussian", "gaussian_learned", "discretized_logistic"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Architecture = Literal["conv", "resnet"]
LatentKind = Literal["dense", "spatial"]
Binarization = Literal["auto", "on", "off"]
LIKELIHOODS = typing.get_args(Likelihood)
PRECISIONS = typing.get_args(Precision)
ARCHITECTURES = typing.get_args(Architecture)
LATENT_KINDS = typing.get_args(LatentKind)
# Booleans (a YAML file's `off` is one) and the strings older configs stored, as their choice.
BINARIZATION_ALIASES = {True: "on", False: "off", "true": "on", "1": "on", "false": "off", "0": "off"}


class Widths(tuple):
    """Channel widths, given as 32,64 or [32, 64] or (32, 64) on the command line, a list in a file."""

    @classmethod
    def parse(cls, value: object) -> Widths:
        items = value.strip().strip("()[]").split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"expected widths such as 32,64, got {value!r}")
        if any(isinstance(item, (bool, float)) for item in items):
            raise ValueError(f"expected whole numbers such as 32,64, got {value!r}")
        return cls(int(item) for item in items)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are read."""

    shards: str = "out/shards"
    """Directory or URL prefix (s3://, gs://, https://) with manifest.json, a manifest .json path, or a shard pattern."""
    batch_size: int = 128
    """Images per batch on each rank (global batch = batch_size x world size)."""
    num_workers: int = 1
    """Loader worker processes per rank (0 reads in the training process)."""
    dynamic_binarization: Binarization | bool = "auto"
    """Train on x ~ Bernoulli(pixel) drawn afresh each batch, val binarised once with a fixed seed:
    on, off, or auto (on for a 1-channel bernoulli model)."""
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
    """The network and its likelihood p(x|z)."""

    preset: str = "conv"
    """Named defaults for the other model fields (conv, resnet-s, resnet-m, resnet-l; --help lists them); explicit flags win."""
    architecture: Architecture = "conv"
    """conv (two stride-2 convolutions, for digits) or resnet (GroupNorm residual stages, scales with size)."""
    image_size: int = 28
    """Height and width of the (square) images; conv: a multiple of 4."""
    channels: int = 1
    """Image channels: 1 (grey) or 3 (RGB)."""
    latent_dim: int = 16
    """Size of z (a spatial latent: latent_channels x s x s, worked out from the image size)."""
    latent_kind: LatentKind = "dense"
    """resnet: dense (a vector through dense layers) or spatial (C x s x s at the lowest resolution, no dense layers)."""
    latent_channels: int = 4
    """resnet with a spatial latent: its channels C."""
    widths: Widths = Widths((32, 64))
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
    likelihood: Likelihood = "bernoulli"
    """p(x|z): bernoulli, gaussian (fixed sigma), gaussian_learned, discretized_logistic (8-bit)."""
    gaussian_sigma: float = 0.1
    """Standard deviation of the fixed-variance Gaussian likelihood (pixels in [0, 1])."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, its schedule, the KL weight and the EMA of the weights."""

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
    """Limits, cadence, precision, tracking and logs."""

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
    precision: Precision = "auto"
    """'auto' (bf16 where native), 'bf16', 'fp16' (CUDA only, with GradScaler) or 'fp32'."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    max_consecutive_skips: int = 20
    """Stop with an error after this many non-finite steps in a row."""
    seed: int = 0
    """Seed for weights, noise and data order."""
    tracking_uri: str = ""
    """MLflow tracking URI ('' means $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/../mlflow.db)."""
    experiment: str = ""
    """MLflow experiment name ('' means $MLFLOW_EXPERIMENT_NAME, else vae-pipeline)."""
    run_name: str = ""
    """MLflow run name ('' derives a readable one from the config)."""
    system_metrics: bool = True
    """MLflow's system/ metrics (CPU, memory, disk, network; GPU utilisation and memory with nvidia-ml-py)
    every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 10), and process/ metrics (this process's
    memory, PyTorch's GPU memory) with the training metrics."""
    tracking_flush_timeout_s: float = 60.0
    """At the end, wait this long for an unreachable tracking server before saving unsent metrics to disk."""
    log_all_ranks: bool = False
    """Log progress from every rank (default: rank 0 only; other ranks log warnings and errors)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training job needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """Every problem with a config, listed together."""


def _coerce(value, annotation, where: str, problems: list[str]):
    """`value` as `annotation` says (values from a dict: a checkpoint's config, a test's overrides)."""
    kind = typing.get_origin(annotation) or annotation
    if kind is Literal:
        if value in typing.get_args(annotation):
            return value
        problems.append(f"{where}: expected one of {', '.join(typing.get_args(annotation))}, got {value!r}")
        return None
    try:
        if kind is Widths:
            return Widths.parse(value)
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


def binarizes(config: TrainConfig) -> bool:
    """Whether training binarises inputs dynamically (and evaluation binarises once, seeded)."""
    if config.data.dynamic_binarization == "auto":
        return config.model.likelihood == "bernoulli" and config.model.channels == 1
    return config.data.dynamic_binarization == "on"


def _validate(config: TrainConfig) -> list[str]:
    problems = []
    model, data, run, optim = config.model, config.data, config.run, config.optim
    if model.architecture == "conv" and (model.image_size % 4 or model.image_size < 4):
        problems.append(f"model.image_size: must be a positive multiple of 4 for the conv architecture, "
                        f"got {model.image_size}")
    if model.architecture == "resnet" and model.image_size < 1:
        problems.append(f"model.image_size: must be >= 1, got {model.image_size}")
    if model.channels not in (1, 3):
        problems.append(f"model.channels: must be 1 or 3, got {model.channels}")
    if model.architecture == "conv" and (len(model.widths) != 2 or min(model.widths, default=0) < 1):
        problems.append(f"model.widths: expected two positive widths for the conv architecture, got {model.widths}")
    if model.architecture == "resnet" and (not model.widths or min(model.widths) < 1):
        problems.append(f"model.widths: expected one or more positive widths, got {model.widths}")
    if model.latent_kind == "spatial" and model.architecture != "resnet":
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
    if binarizes(config) and model.likelihood != "bernoulli":
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
            hint = hints[key]
            if (section.name, key) == ("data", "dynamic_binarization"):  # a boolean names a choice: on/off
                value, hint = BINARIZATION_ALIASES.get(value if isinstance(value, bool) else str(value).lower(),
                                                       value), Binarization
            coerced = _coerce(value, hint, f"{section.name}.{key}", problems)
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


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))
USAGE = "torchrun --standalone --nproc_per_node=N -m train [--config FILE] [--section.field VALUE ...]"


def parse_command_line(argv: list[str], description: str = "") -> tuple[TrainConfig, bool]:
    """(config, whether --print_config was given) from `[--config FILE] [--section.field VALUE ...]`.

    Files (YAML or JSON, `{section: {field: value}}`) apply in order and flags after them win.
    Raises ConfigError listing every problem; --help prints the help and exits.
    """
    from jsonargparse import ArgumentError

    parser = _parser(description)
    try:
        given = parser.parse_args(argv, defaults=False).as_dict()
    except ArgumentError:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(_every_problem(parser, argv))) from None
    return build_config(_sections(given)), bool(given.get("print_config"))


def _sections(given: dict) -> dict:
    """The config sections of what the parser read (not --config or --print_config)."""
    return {name: values for name, values in given.items() if name in SECTIONS}


def parse_args(argv: list[str]) -> TrainConfig:
    """A validated TrainConfig from command-line arguments (see parse_command_line)."""
    return parse_command_line(argv)[0]


def config_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML: what --print_config prints and --config reads back."""
    import yaml

    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)


def _every_problem(parser, argv: list[str]) -> list[str]:
    """The parser stops at the first problem: parse each argument alone (a flag with its value, each
    key of a config file), then check the arguments that parsed together."""
    from jsonargparse import ArgumentError

    problems, parsed = [], []
    for unit in _arguments(argv):
        flag, _, path = unit[0].partition("=")
        if flag == "--config" and (path or len(unit) > 1):
            path = path or unit[1]
            found = [f"config file {path}: {problem}" for problem in _file_problems(parser, path)]
        else:
            try:
                parser.parse_args(unit, defaults=False)
                found = []
            except ArgumentError as error:
                found = [f"{' '.join(unit)}: {_one_line(error)}"]
        problems += found
        parsed += [] if found else unit
    try:
        build_config(_sections(parser.parse_args(parsed, defaults=False).as_dict()))
    except ArgumentError as error:
        problems.append(_one_line(error))
    except ConfigError as error:
        problems += [line.strip() for line in str(error).splitlines()[1:]]
    return problems


def _arguments(argv: list[str]) -> list[list[str]]:
    """argv split into arguments: each `--flag` with the value after it (`--data.batch_size 64`)."""
    units: list[list[str]] = []
    for arg in argv:
        takes_value = bool(units) and units[-1][0].startswith("--") and "=" not in units[-1][0] \
            and len(units[-1]) == 1
        if takes_value and not arg.startswith("--"):
            units[-1].append(arg)
        else:
            units.append([arg])
    return units


def _file_problems(parser, path: str) -> list[str]:
    """A config file's problems: unreadable, not YAML, or each `section: {field: value}` that fails."""
    from jsonargparse import ArgumentError
    import yaml

    try:
        with open(path) as file:
            content = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as error:
        return [_one_line(error)]
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        return [f"expected {{section: {{field: value}}}}, got {_one_line(content)[:200]!r}"]
    problems = []
    for section, values in content.items():
        for key, value in values.items():
            try:
                parser.parse_object({section: {key: value}}, defaults=False)
            except ArgumentError as error:
                problems.append(_one_line(error))
    return problems


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@functools.cache
def _parser(description: str):
    """The jsonargparse parser over TrainConfig: --help shows each field's docstring and default."""
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    jsonargparse.typing.register_type(Widths, serializer=list, deserializer=Widths.parse)
    parser = jsonargparse.ArgumentParser(prog="python -m train", usage=USAGE, description=description,
                                         formatter_class=_help_formatter(), exit_on_error=False,
                                         print_config=None)
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile, metavar="FILE",
                        help="A YAML or JSON file {section: {field: value}}; later files and flags override it.")
    parser.add_argument("--print_config", action="store_true",
                        help="Print the resolved config as YAML (a file --config reads back) and exit.")
    parser.add_class_arguments(TrainConfig)
    for action in parser._actions:  # jsonargparse adds `--SECTION FILE` for each section's own file
        if action.dest in SECTIONS:
            action.metavar = "FILE"
            action.help = f"A YAML or JSON file with {action.dest} fields only ({{field: value}})."
    return parser


def _help_formatter():
    """Help that shows each flag as `--section.field=DEFAULT` (a value the parser accepts) and keeps
    the description's own line breaks (the preset table)."""
    import argparse

    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action) -> str:  # our text alone: the flag shows the default
            if action.dest == "help":
                return super()._get_help_string(action)
            return (action.help or "").replace("%", "%%")

        def _format_action_invocation(self, action) -> str:
            if "." not in action.dest or not action.option_strings or action.nargs == 0:
                return super()._format_action_invocation(action)
            default = action.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            shown = str(shown).lower() if isinstance(shown, bool) else shown
            return f"{action.option_strings[0]}={shown}"

    return HelpFormatter


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
