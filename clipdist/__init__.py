"""clipdist: CLIP training at large global batch (WebDataset shards, DeepSpeed towers, a
contrastive loss over the global batch, Hydra configs). Entry points: ``python -m clipdist.train``
and its siblings (evaluate, export, report, sweep, data.write_shards, data.index)."""

from importlib import metadata

try:
    # One source for the version: pyproject.toml, as installed (a wheel or `pip install -e`).
    __version__ = metadata.version("clipdist")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
