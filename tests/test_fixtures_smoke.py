"""The shared trained/exported fixtures are real: a model that learned, files that load."""

import json

import numpy as np


def test_exported_model_reconstructs_real_digits_better_than_the_mean(exported_model, small_shards):
    from pipeline.images import nhwc_to_nchw, to_unit_float
    from pipeline.manifest import read_manifest
    from pipeline.shards import read_shard_images
    from serve import ops
    from serve.ops import Direct
    from serve.runtime import VAERuntime

    runtime = VAERuntime(exported_model, providers=("CPUExecutionProvider",))
    manifest = read_manifest(small_shards)
    images, _ = read_shard_images(small_shards / manifest.shards("val")[0].name, manifest.image_shape)
    x = nhwc_to_nchw(to_unit_float(images))
    recon_error = np.mean((Direct(runtime).run(ops.reconstruct, x) - x) ** 2)
    mean_image_error = np.mean((x.mean(axis=0, keepdims=True) - x) ** 2)
    assert recon_error < 0.6 * mean_image_error
    assert json.loads((exported_model / "model.json").read_text())["training_step"] == 300
