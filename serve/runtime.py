"""onnxruntime sessions over an exported model directory: no torch anywhere in serve/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def nvidia_gpu_present() -> bool:
    """True when the NVIDIA driver exposes a device (onnxruntime-gpu lists CUDA either way)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def choose_providers(preferred: tuple[str, ...]) -> list[str]:
    """`preferred` filtered to what is installed and usable here, CPU always last."""
    available = set(ort.get_available_providers())
    gpu = nvidia_gpu_present()
    chosen = [p for p in preferred if p in available and (gpu or p not in GPU_PROVIDERS)]
    return chosen if "CPUExecutionProvider" in chosen else [*chosen, "CPUExecutionProvider"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class VAERuntime:
    """Encoder and decoder sessions plus the model's metadata (model.json)."""

    def __init__(self, model_dir: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS,
                 intra_op_threads: int = 0) -> None:
        model_dir = Path(model_dir)
        metadata_path = model_dir / "model.json"
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{model_dir} has no model.json: export a model with `python -m export`")
        self.metadata = json.loads(metadata_path.read_text())
        chosen = choose_providers(providers)
        ort.set_default_logger_severity(3)  # a failed GPU provider is reported through `provider`
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.encoder = ort.InferenceSession(str(model_dir / self.metadata["encoder"]["file"]),
                                            options, providers=chosen)
        self.decoder = ort.InferenceSession(str(model_dir / self.metadata["decoder"]["file"]),
                                            options, providers=chosen)
        self.latent_dim = int(self.metadata["latent_dim"])
        self.image_shape = tuple(self.metadata["image_shape"])  # (C, H, W)

    @property
    def provider(self) -> str:
        """The provider the sessions actually run on (onnxruntime falls back silently)."""
        return self.decoder.get_providers()[0]

    def check_images(self, x: np.ndarray) -> np.ndarray:
        """Validate a float batch (B, C, H, W) in [0, 1]; the error names what is wrong."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"expected float pixels in [0, 1], got {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError("images contain NaN or Inf")
        return x.astype(np.float32, copy=False)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, C, H, W) in [0, 1] -> (mean, logvar), each (B, latent)."""
        mean, logvar = self.encoder.run(None, {"x": self.check_images(x)})
        return mean, logvar

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents (B, latent) -> pixel probabilities (B, C, H, W)."""
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents of shape (B, {self.latent_dim}), got {z.shape}")
        _, probs = self.decoder.run(None, {"z": z})
        return probs

    def sample(self, num: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """`num` new images (B, C, H, W) from z ~ N(0, temperature^2 I), reproducible per seed."""
        z = np.random.default_rng(seed).standard_normal((num, self.latent_dim)).astype(np.float32)
        return self.decode(z * temperature)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """Decode the posterior mean of each image."""
        mean, _ = self.encode(x)
        return self.decode(mean)
