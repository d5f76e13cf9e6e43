"""WebDataset shards in, equal-length per-rank batches out; see pipeline.py for the layout and
epochs.py for the position a checkpoint stores."""

from clipdist.data.counts import DataError
from clipdist.data.epochs import DataStats, TrainData, describe_counts
from clipdist.data.pipeline import Batch, EvalLoader, TrainLoader, build_eval_loader, build_train_loader, ensure_data

__all__ = [
    "Batch",
    "DataError",
    "DataStats",
    "EvalLoader",
    "TrainData",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "describe_counts",
    "ensure_data",
]
