"""Named model presets (`--model.preset=NAME`): sensible model defaults for a range of image sizes.

A preset only fills in model fields the user did not give: explicit flags (and config-file keys)
override a preset's fields. The resolved fields, not the preset's name, are what a checkpoint
stores and rebuilds from, so changing a preset later never changes a trained model.

Light on purpose (no torch at import): train.config reads PRESETS.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """Model fields a preset sets, the image sizes it is meant for, and one line on what it is."""

    fields: dict[str, object]
    sizes: tuple[int, int]
    summary: str
    figure_sizes: tuple[int, ...] = field(default=())

    @property
    def measured_at(self) -> tuple[int, ...]:
        """Sizes at which --help measures parameters and FLOPs (default: the ends of `sizes`)."""
        return self.figure_sizes or tuple(sorted(set(self.sizes)))


PRESETS: dict[str, Preset] = {
    "conv": Preset(
        {}, (28, 32),
        "the original digits net and the default: two stride-2 convolutions, a dense bottleneck",
        figure_sizes=(28,)),
    "resnet-s": Preset(
        {"architecture": "resnet", "widths": (32, 64, 128), "blocks_per_stage": 1, "attention": False,
         "lowest_resolution": 4, "hidden_dim": 512, "latent_dim": 32},
        (28, 64), "ResNet, 1 block per stage, widths 32-64-128"),
    "resnet-m": Preset(
        {"architecture": "resnet", "widths": (32, 64, 128, 256), "blocks_per_stage": 2, "attention": True,
         "lowest_resolution": 4, "hidden_dim": 512, "latent_dim": 64},
        (64, 128), "ResNet, 2 blocks per stage, widths 32-64-128-256, attention at 4x4"),
    "resnet-l": Preset(
        {"architecture": "resnet", "widths": (64, 128, 256, 256), "blocks_per_stage": 2, "attention": True,
         "lowest_resolution": 4, "hidden_dim": 1024, "latent_dim": 128},
        (128, 256), "ResNet, 2 blocks per stage, widths 64-128-256-256, attention at 4x4"),
}
DEFAULT_PRESET = "conv"

# (parameters, forward FLOPs per image) at each preset's `measured_at` sizes, as `preset_figures`
# measures them (3-channel discretized_logistic; conv: 1-channel bernoulli). Stored so --help needs
# no torch; tests/test_model_presets.py re-measures them and fails with the new values when a preset changes.
FIGURES: dict[str, dict[int, tuple[int, int]]] = {
    "conv": {28: (1_688_289, 10_059_776)},
    "resnet-s": {28: (8_626_150, 378_274_816), 64: (6_069_606, 1_559_068_672)},
    "resnet-m": {64: (22_511_270, 3_425_632_256), 128: (28_416_166, 13_417_250_816)},
    "resnet-l": {128: (38_702_662, 40_539_258_880), 256: (44_607_558, 161_844_822_016)},
}


def apply_preset(model_fields: dict[str, object], problems: list[str]) -> dict[str, object]:
    """The preset's fields overlaid with the explicitly given ones; an unknown preset is a problem."""
    name = model_fields.get("preset", DEFAULT_PRESET)
    preset = PRESETS.get(str(name))
    if preset is None:
        problems.append(f"model.preset: expected one of {', '.join(PRESETS)}, got {name!r}")
        return dict(model_fields)
    return {**preset.fields, **model_fields, "preset": str(name)}


def preset_figures(name: str, image_size: int, channels: int = 3,
                   likelihood: str = "discretized_logistic") -> tuple[int, int]:
    """(parameters, forward FLOPs per image: encode + decode) of a preset at one image size.

    FLOPs come from torch.utils.flop_counter.FlopCounterMode on the meta device: exact counts of
    the convolutions and matrix products from shapes alone, without computing anything.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train.config import build_config
    from train.model import build_model

    config = build_config({"model": {"preset": name, "image_size": image_size, "channels": channels,
                                     "likelihood": likelihood},
                           "data": {"dynamic_binarization": "off"}}).model
    with torch.device("meta"):
        model = build_model(config)
        x = torch.empty(1, channels, image_size, image_size)
    parameters = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.decode(model.encode(x).mean)
    return parameters, counter.get_total_flops()


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def figure_channels(name: str) -> tuple[int, str]:
    """(channels, likelihood) the figures of a preset are given for: conv as trained on digits."""
    return (1, "bernoulli") if name == "conv" else (3, "discretized_logistic")


def measure_figures() -> dict[str, dict[int, tuple[int, int]]]:
    """FIGURES, measured afresh (builds every preset on the meta device: a few seconds)."""
    return {name: {size: preset_figures(name, size, *figure_channels(name)) for size in preset.measured_at}
            for name, preset in PRESETS.items()}


def presets_help() -> str:
    """A table of the presets for --help: intended sizes, parameters and FLOPs per image."""
    lines = ["Model presets (--model.preset=NAME; explicit --model.* flags override a preset's fields).",
             "Parameters and forward FLOPs (encode + decode, torch.utils.flop_counter) per image at the",
             "sizes shown, for 3-channel discretized_logistic (conv: 1-channel bernoulli, as on digits):",
             f"  {'preset':<10} {'sizes':<11} {'at':>6} {'params':>8} {'FLOPs':>8}  what"]
    for name, preset in PRESETS.items():
        for index, (size, (parameters, flops)) in enumerate(FIGURES[name].items()):
            first = index == 0
            sizes = f"{preset.sizes[0]}-{preset.sizes[1]} px" if first else ""
            lines.append(f"  {name if first else '':<10} {sizes:<11} {size:>3} px {_si(parameters):>8} "
                         f"{_si(flops):>8}  {preset.summary if first else ''}".rstrip())
    return "\n".join(lines)
