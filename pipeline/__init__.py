"""Images to sharded WebDataset tar files, and shards to training batches.

Kept light on purpose: `pipeline.images`, `pipeline.shards` and `pipeline.manifest` need only
numpy and Pillow (so `serve/` can preprocess exactly as training did); torch is imported only
by `pipeline.loader`.
"""

__version__ = "0.1.0"
