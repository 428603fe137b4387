"""serve runs the fp16 variant that export lists in model.json, and it agrees with fp32."""

import numpy as np

from serve import ops
from serve.runtime import RuntimeOptions, VAERuntime


def test_fp16_variant_from_export_matches_fp32(exported_model_fp16):
    fp32 = VAERuntime(exported_model_fp16)
    fp16 = VAERuntime(exported_model_fp16, options=RuntimeOptions(variant="fp16"))
    images32, images16 = (ops.Direct(runtime).run(ops.sample, 32, seed=3) for runtime in (fp32, fp16))
    assert images16.dtype == np.float32 and images16.shape == images32.shape
    assert np.abs(images16 - images32).max() < 1e-2
