"""Zero-shot classification and retrieval over eval shards, on all ranks (suite.py runs them)."""

from clipdist.eval.retrieval import retrieval_eval
from clipdist.eval.suite import EvalReport, EvalShape, run_evals, summary_fields
from clipdist.eval.zero_shot import PAD_LABEL, build_classifier, zero_shot_eval

__all__ = ["PAD_LABEL", "EvalReport", "EvalShape", "build_classifier", "retrieval_eval", "run_evals", "summary_fields", "zero_shot_eval"]
