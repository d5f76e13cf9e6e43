from clipdist.eval.zero_shot import PAD_LABEL, build_classifier, zero_shot_eval

__all__ = ["PAD_LABEL", "build_classifier", "zero_shot_eval"]
