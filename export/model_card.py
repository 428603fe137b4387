"""The model card: model.json beside the ONNX files, the one place its name is spelled and its contents read.

Torch-, onnx- and MLflow-free, so export's tools and the torch-free `serve/` read it alike (serve may import
export, never the other way). `read_model_json` gives the raw dict (export's tools, which add to it);
`read_model_card` gives the typed, checked card serve runs from.

A model directory is untrusted input (a registry download, another team's export): every value is
type-checked and bounded before anything is allocated from it, file names must be plain names inside
the directory, and every problem is reported at once. `serve.runtime` then checks the ONNX graphs
against this card and runs them once before it answers anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from export.score_statistics import ScoreStatistics

METADATA_FILE = "model.json"
SCORE_STATISTICS_KEY = "anomaly_score"
"""model.json's entry for the default anomaly score's statistics (export.score_statistics.ScoreStatistics)."""
# The likelihood layouts the decoder's `params` output can have (serve.likelihoods computes each), with the
# channels of `params` per image channel.
PARAMS_PER_CHANNEL = {"bernoulli": 1, "gaussian": 1, "gaussian_learned": 2, "discretized_logistic": 2}
MAX_LATENT_DIM = 65_536
"""Largest latent size served; anything bigger is a corrupt or hostile model.json (1e9 would allocate GiBs)."""
MAX_IMAGE_SIDE = 8_192
"""Largest image height or width served."""
IMAGE_CHANNELS = (1, 3)
GRAPHS = ("encoder", "decoder")


class ModelDirError(ValueError):
    """A model directory that does not hold what serve can run; the message lists every problem."""


@dataclass(frozen=True)
class GraphFiles:
    """The ONNX files of one variant, as paths inside the model directory."""

    encoder: Path
    decoder: Path


@dataclass(frozen=True)
class ModelCard:
    """What model.json declares, checked."""

    model_dir: Path
    latent_dim: int
    """Size of z."""
    image_shape: tuple[int, int, int]
    """(C, H, W) of the images the encoder takes and the decoder emits."""
    likelihood: str
    """One of PARAMS_PER_CHANNEL's names."""
    likelihood_params: dict[str, float]
    """Constants of p(x|z) (e.g. a fixed Gaussian sigma), finite numbers."""
    variants: dict[str, GraphFiles]
    """'' (the default fp32 graphs) and each variant listed in model.json."""
    metadata: dict = field(repr=False)
    """model.json as read (for display only: everything serve relies on is in the other fields)."""
    score_statistics: ScoreStatistics | None = None
    """What standardises the default anomaly score; None for models exported before it existed."""

    def files(self, variant: str = "") -> GraphFiles:
        if variant not in self.variants:
            raise ModelDirError(f"model.json lists no variant {variant!r}; it has "
                                f"{sorted(v for v in self.variants if v) or 'none'}")
        return self.variants[variant]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _graph_file(model_dir: Path, value, where: str, problems: list[str]) -> Path | None:
    """`value` ({"file": NAME} or NAME) as a path, if NAME is a plain file name of a file in `model_dir`."""
    name = value.get("file") if isinstance(value, dict) else value
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: expected a file name, got {name!r}")
        return None
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        problems.append(f"{where}: {name!r} is not a plain file name inside the model directory")
        return None
    path = model_dir / name
    if not path.is_file():
        problems.append(f"{where}: {name!r} is not a file in {model_dir}")
        return None
    if path.resolve().parent != model_dir.resolve():  # a symlink out of the directory
        problems.append(f"{where}: {name!r} points outside the model directory")
        return None
    return path


def _likelihood_params(name: str, params, problems: list[str]) -> dict[str, float]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        problems.append(f"likelihood_params: expected an object, got {type(params).__name__}")
        return {}
    bad = {key: value for key, value in params.items() if not _is_number(value)}
    if bad:
        problems.append(f"likelihood_params: expected finite numbers, got {bad}")
    if name == "gaussian" and not (_is_number(params.get("sigma")) and params["sigma"] > 0):
        problems.append(f"likelihood_params.sigma: the gaussian likelihood needs a number > 0, "
                        f"got {params.get('sigma')!r}")
    for key in ("bin_width", "sigma"):
        if key in params and _is_number(params[key]) and not params[key] > 0:
            problems.append(f"likelihood_params.{key}: must be > 0, got {params[key]}")
    return {key: float(value) for key, value in params.items() if _is_number(value)}


def has_model_card(model_dir: str | Path) -> bool:
    return (Path(model_dir) / METADATA_FILE).is_file()


def read_model_json(model_dir: str | Path) -> dict:
    """model.json of `model_dir` as a dict; a directory without one, or a file that is no JSON object, is a
    clear error."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {METADATA_FILE}: export a model with `python -m export`")
    try:
        metadata = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelDirError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(metadata, dict):
        raise ModelDirError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    return metadata


def read_model_card(model_dir: str | Path) -> ModelCard:
    """model.json of `model_dir`, checked; raises ModelDirError naming every problem."""
    model_dir = Path(model_dir)
    path = model_dir / METADATA_FILE
    metadata = read_model_json(model_dir)
    problems: list[str] = []

    latent_dim = metadata.get("latent_dim")
    if not (_is_int(latent_dim) and 1 <= latent_dim <= MAX_LATENT_DIM):
        problems.append(f"latent_dim: expected an integer in [1, {MAX_LATENT_DIM}], got {latent_dim!r}")
    image_shape = metadata.get("image_shape")
    if not (isinstance(image_shape, list) and len(image_shape) == 3 and all(_is_int(d) for d in image_shape)
            and image_shape[0] in IMAGE_CHANNELS and all(1 <= d <= MAX_IMAGE_SIDE for d in image_shape[1:])):
        problems.append(f"image_shape: expected [C, H, W] with C in {IMAGE_CHANNELS} and H, W integers in "
                        f"[1, {MAX_IMAGE_SIDE}], got {image_shape!r}")
    likelihood = metadata.get("likelihood", "bernoulli")
    if likelihood not in PARAMS_PER_CHANNEL:
        problems.append(f"likelihood: expected one of {sorted(PARAMS_PER_CHANNEL)}, got {likelihood!r}")
    params = _likelihood_params(likelihood, metadata.get("likelihood_params"), problems)

    variants: dict[str, GraphFiles] = {}
    default = [_graph_file(model_dir, metadata.get(graph), graph, problems) for graph in GRAPHS]
    if all(default):
        variants[""] = GraphFiles(*default)
    listed = metadata.get("variants") or {}
    if not isinstance(listed, dict):
        problems.append(f"variants: expected an object, got {type(listed).__name__}")
        listed = {}
    for name, entry in listed.items():
        if not isinstance(entry, dict):
            problems.append(f"variants.{name}: expected an object with encoder and decoder, got {entry!r}")
            continue
        files = [_graph_file(model_dir, entry.get(graph), f"variants.{name}.{graph}", problems) for graph in GRAPHS]
        if all(files):
            variants[name] = GraphFiles(*files)

    statistics = None
    if metadata.get(SCORE_STATISTICS_KEY) is not None:
        try:
            statistics = ScoreStatistics.from_json(metadata[SCORE_STATISTICS_KEY])
        except ValueError as error:
            problems.append(f"{SCORE_STATISTICS_KEY}: {error}")

    if problems:
        raise ModelDirError(f"{path} does not describe a model serve can run:\n  - " + "\n  - ".join(problems))
    return ModelCard(model_dir, latent_dim, tuple(image_shape), likelihood, params, variants, metadata,
                     statistics)
