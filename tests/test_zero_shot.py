"""Zero-shot classifier and accuracy on a hand-built model whose answers are known exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_distributed

from clipdist.config import ModelConfig, TextConfig, VisionConfig
from clipdist.eval import PAD_LABEL, build_classifier, zero_shot_eval
from clipdist.models import build_model, tokenize

CLASSNAMES = [f"class{i}" for i in range(10)]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
# Where the true class lands in each sample's ranking: 7 of 10 first, 9 of 10 in the top 5.
TRUE_CLASS_RANKS = [0, 0, 2, 0, 0, 4, 0, 7, 0, 0]
EXPECTED = {"top1": 0.7, "top5": 0.9, "count": 10}


def toy_tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """Token 0: the class index, token 1: the template index (enough for ToyCLIP)."""
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens[row, 0] = next(i for i, name in enumerate(CLASSNAMES) if f" {name}." in text)
        tokens[row, 1] = next(i for i, t in enumerate(TEMPLATES) if t.format(CLASSNAMES[tokens[row, 0]]) == text)
    return tokens


class ToyCLIP(nn.Module):
    """Text: one-hot class plus a template-dependent tilt (+eps / -eps) that the template mean
    cancels. Images: score vectors over the classes, passed through an identity projection."""

    def __init__(self, num_classes: int, eps: float = 0.3) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.eye(num_classes))
        self.eps = eps

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        num_classes = self.proj.shape[0]
        cls, template = tokens[:, 0], tokens[:, 1]
        tilt = torch.where(template == 0, self.eps, -self.eps)[:, None]
        x = F.one_hot(cls, num_classes).float() + tilt * F.one_hot((cls + 1) % num_classes, num_classes).float()
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = images @ self.proj
        return F.normalize(x, dim=-1) if normalize else x


def _samples() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i scores the classes so that label i % 10 sits at position TRUE_CLASS_RANKS[i]."""
    num_classes = len(CLASSNAMES)
    images, labels = [], []
    for i, position in enumerate(TRUE_CLASS_RANKS):
        label = i % num_classes
        others = [c for c in range(num_classes) if c != label]
        order = others[:position] + [label] + others[position:]
        scores = torch.empty(num_classes)
        scores[order] = torch.arange(num_classes, 0, -1, dtype=torch.float32)
        images.append(scores)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pad to num_batches * batch_size with rows that would score as correct if counted."""
    pad = num_batches * batch_size - len(labels)
    images = torch.cat([images, F.one_hot(torch.zeros(pad, dtype=torch.long), images.shape[1]).float()])
    labels = torch.cat([labels, torch.full((pad,), PAD_LABEL)])
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]


def _evaluate(rank: int, world_size: int) -> dict[str, float | int]:
    model = ToyCLIP(len(CLASSNAMES))
    model.train()
    classifier = build_classifier(model, toy_tokenize, CLASSNAMES, TEMPLATES, "cpu", context_length=4, batch_size=3)
    images, labels = _samples()
    # Uneven split: rank 0 gets 6 rows, rank 1 gets 4; both see two batches of 3.
    bounds = [0, 6, 10] if world_size == 2 else [0, 10]
    shard = slice(bounds[rank], bounds[rank + 1])
    loader = _batches(images[shard], labels[shard], batch_size=3, num_batches=2 if world_size == 2 else 4)
    results = zero_shot_eval(model, loader, classifier, "cpu")
    assert model.training, "zero_shot_eval must restore training mode"
    return results


def test_classifier_is_the_template_mean():
    model = ToyCLIP(len(CLASSNAMES))
    classifier = build_classifier(model, toy_tokenize, CLASSNAMES, TEMPLATES, "cpu", context_length=4, batch_size=7)
    # The ±eps tilts cancel in the template mean, leaving the one-hot class vectors.
    torch.testing.assert_close(classifier, torch.eye(len(CLASSNAMES)), rtol=0, atol=1e-6, msg="classifier vs identity (tol 1e-6)")


def test_single_process_accuracy_is_known():
    # Reference: constructed so that 7/10 are top-1 and 9/10 top-5; padding rows ignored. Exact.
    assert _evaluate(0, 1) == EXPECTED


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_give_the_same_accuracy():
    # Reference: the same known answer on every rank, from one all_reduce of the counts. Exact.
    assert run_distributed(_evaluate, world_size=2) == [EXPECTED, EXPECTED]


def test_rejects_empty_inputs():
    model = ToyCLIP(len(CLASSNAMES))
    with pytest.raises(ValueError, match="needs class names and templates"):
        build_classifier(model, toy_tokenize, [], TEMPLATES, "cpu")
    loader = _batches(torch.zeros(0, len(CLASSNAMES)), torch.zeros(0, dtype=torch.long), batch_size=2, num_batches=1)
    with pytest.raises(ValueError, match="no labelled rows"):
        zero_shot_eval(model, loader, torch.eye(len(CLASSNAMES)), "cpu")


TINY_CLIP = ModelConfig(
    name="tiny-vit",
    embed_dim=16,
    vision=VisionConfig(arch="vit", image_size=32, width=32, layers=1, patch_size=8, head_width=16),
    text=TextConfig(context_length=16, width=24, heads=2, layers=1),
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_model_matches_direct_computation(dtype):
    torch.manual_seed(0)
    model = build_model(TINY_CLIP).to(dtype)
    classnames, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a sketch of a {}."]
    classifier = build_classifier(model, tokenize, classnames, templates, "cpu", context_length=16, batch_size=4)
    with torch.no_grad():
        cat = model.encode_text(tokenize(["a photo of a cat.", "a sketch of a cat."], 16), normalize=True).float().mean(0)
    # Reference: the renormalised template mean, computed by hand for one class.
    torch.testing.assert_close(classifier[:, 0], F.normalize(cat, dim=0), rtol=0, atol=1e-6, msg="class 'cat' column (tol 1e-6)")

    images = torch.randn(6, 3, 32, 32)  # float32: zero_shot_eval casts to the model's dtype
    labels = torch.tensor([0, 1, 2, 0, PAD_LABEL, PAD_LABEL])
    results = zero_shot_eval(model, [(images[:3], labels[:3]), (images[3:], labels[3:])], classifier, "cpu", topk=(1, 2))
    with torch.no_grad():
        predictions = (model.encode_image(images[:4].to(dtype)).float() @ classifier).argsort(dim=1, descending=True)
    # Reference: top-k by hand on the 4 labelled rows. Exact.
    top1 = (predictions[:, 0] == labels[:4]).sum().item() / 4
    top2 = (predictions[:, :2] == labels[:4, None]).any(dim=1).sum().item() / 4
    assert results == {"top1": top1, "top2": top2, "count": 4}
