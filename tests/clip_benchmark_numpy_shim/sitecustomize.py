"""Put on PYTHONPATH of a ``clip_benchmark`` process by tests/test_clip_benchmark.py.

clip_benchmark 1.6.2's zero-shot ``accuracy()`` converts a one-element array with ``float()``,
which NumPy 2.4 refuses (only 0-d arrays convert). Where NumPy refuses, this swaps in the same
computation with ``.item()``; everything else clip_benchmark does is unchanged.
"""

import numpy

try:
    float(numpy.ones(1))
except TypeError:
    import clip_benchmark.metrics.zeroshot_classification as zeroshot_classification

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    zeroshot_classification.accuracy = accuracy
