"""WebDataset shards in, equal-length per-rank batches out; see pipeline.py for the layout."""

from clipdist.data.pipeline import Batch, EvalLoader, TrainLoader, build_eval_loader, build_train_loader, ensure_data

__all__ = ["Batch", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader", "ensure_data"]
