"""Zero-shot classifier and accuracy on a hand-built model whose answers are known exactly;
template sets and class-name files."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_distributed

from clipdist.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from clipdist.eval import PAD_LABEL, build_classifier, zero_shot_eval
from clipdist.eval.embed import rank0_buffers
from clipdist.eval.sets import resolve_classnames, resolve_templates
from clipdist.eval.templates import IMAGENET80, SHORT
from clipdist.eval.zero_shot import class_share
from clipdist.models import build_model, tokenize

CLASSNAMES = [f"class{i}" for i in range(10)]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
# Where the true class lands in each sample's ranking: 7 of 10 first, 9 of 10 in the top 5.
TRUE_CLASS_RANKS = [0, 0, 2, 0, 0, 4, 0, 7, 0, 0]
# One image per class, so the per-class top-1 is 1 where the rank is 0, and its mean is top-1.
PER_CLASS = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
EXPECTED = {"top1": 0.7, "top5": 0.9, "count": 10, "per_class_top1": 0.7, "per_class": PER_CLASS}


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
    """The toy model's accuracy; the classes' embedding is split over the ranks."""
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


def _real_classifier(rank: int, world_size: int, classnames: tuple[str, ...] = ("cat", "dog", "car")) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(TINY_CLIP)
    # 3 classes over 2 ranks: 2 + 1, so rank 1 embeds filler prompts to match rank 0's forwards
    # (1 class: rank 1 embeds fillers only).
    return build_classifier(model, tokenize, list(classnames), ["a photo of a {}.", "a sketch of a {}."], "cpu", context_length=16, batch_size=3)


def _batchnorm_stats(rank: int, world_size: int) -> tuple[list[float], list[float]]:
    """Running means during and after rank0_buffers, starting from rank-specific ones (as data
    parallel training leaves them)."""
    norm = nn.BatchNorm1d(2)
    norm.running_mean.fill_(float(rank + 1))
    with rank0_buffers(norm):
        during = norm.running_mean.tolist()
    return during, norm.running_mean.tolist()


def _on_each_rank(rank: int, world_size: int) -> tuple[dict, list[torch.Tensor], tuple]:
    classifiers = [_real_classifier(rank, world_size), _real_classifier(rank, world_size, ("cat",))]
    return _evaluate(rank, world_size), classifiers, _batchnorm_stats(rank, world_size)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_give_the_same_accuracy_and_classifier():
    # Reference: the same known answer on every rank, from one all_reduce of the counts. Exact.
    # And a real model's classifier, classes split 2 + 1 over the ranks, against the
    # single-process one. Tolerance 1e-6: a text's embedding may round differently in another
    # batch on some BLAS builds (every forward is a full batch, so here it comes out the same).
    single = [_real_classifier(0, 1), _real_classifier(0, 1, ("cat",))]
    results = run_distributed(_on_each_rank, world_size=2)
    assert [accuracy for accuracy, _, _ in results] == [EXPECTED, EXPECTED]
    for _, classifiers, _ in results:
        for classifier, reference in zip(classifiers, single, strict=True):
            torch.testing.assert_close(classifier, reference, rtol=0, atol=1e-6, msg="classifier, 2 ranks vs 1 (tol 1e-6)")
    # Evaluation uses rank 0's BatchNorm statistics everywhere, and leaves each rank its own.
    assert [stats for _, _, stats in results] == [([1.0, 1.0], [1.0, 1.0]), ([1.0, 1.0], [2.0, 2.0])]


def test_classes_are_shared_out_contiguously():
    shares = [class_share(10, rank, 4) for rank in range(4)]
    assert shares == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert [len(class_share(1, rank, 3)) for rank in range(3)] == [1, 0, 0]


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
    # Reference: top-k and per-class top-1 by hand on the 4 labelled rows. Exact.
    correct = (predictions[:, 0] == labels[:4]).long()
    top2 = (predictions[:, :2] == labels[:4, None]).any(dim=1).sum().item() / 4
    per_class = [correct[labels[:4] == c].sum().item() / (labels[:4] == c).sum().item() for c in range(3)]
    expected = {"top1": correct.sum().item() / 4, "top2": top2, "count": 4, "per_class_top1": sum(per_class) / 3, "per_class": per_class}
    assert results == expected


def test_label_outside_the_class_names_is_an_error():
    model = ToyCLIP(len(CLASSNAMES))
    images, labels = _samples()
    labels[3] = len(CLASSNAMES)
    with pytest.raises(ValueError, match=r"1 eval image\(s\) have a label outside 0\.\.9"):
        zero_shot_eval(model, [(images, labels)], torch.eye(len(CLASSNAMES)), "cpu")


def open_clip_metadata():
    """open_clip's zero_shot_metadata.py (no imports of its own), without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "zero_shot_metadata.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_builtin_template_sets_are_open_clips():
    # Reference: open_clip's copy of the CLIP paper's prompts (OpenAI's notebook), order included.
    metadata = open_clip_metadata()
    assert list(IMAGENET80) == [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES] and len(IMAGENET80) == 80
    assert list(SHORT) == [t("{}") for t in metadata.SIMPLE_IMAGENET_TEMPLATES]
    assert resolve_templates("imagenet80", "k") == list(IMAGENET80)
    assert resolve_templates(["a {} b"], "k") == ["a {} b"]


def test_template_and_classname_errors_name_the_key(tmp_path):
    key = "eval.zero_shot[0].templates"
    with pytest.raises(ConfigError, match=r"^eval\.zero_shot\[0\]\.templates: unknown template set 'imagenet81'"):
        resolve_templates("imagenet81", key)
    with pytest.raises(ConfigError, match=r"^eval\.zero_shot\[0\]\.templates\[1\]: every template needs a '\{\}'"):
        resolve_templates(["a {}.", "no placeholder"], key)
    with pytest.raises(ConfigError, match=r"^eval\.zero_shot\[0\]\.classnames: no file .*missing\.txt$"):
        resolve_classnames(str(tmp_path / "missing.txt"), "eval.zero_shot[0].classnames")
    gaps = tmp_path / "gaps.json"
    gaps.write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(ConfigError, match="without gaps"):
        resolve_classnames(str(gaps), "eval.zero_shot[0].classnames")


def test_classnames_from_text_and_json_files(tmp_path):
    (tmp_path / "names.txt").write_text("tench\ngoldfish\n\n great white shark \n")
    (tmp_path / "list.json").write_text(json.dumps(["tench", "goldfish"]))
    # ImageNet's imagenet_class_index.json layout: index -> [wnid, name].
    (tmp_path / "index.json").write_text(json.dumps({"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"]}))
    assert resolve_classnames(str(tmp_path / "names.txt"), "k") == ["tench", "goldfish", "great white shark"]
    assert resolve_classnames(str(tmp_path / "list.json"), "k") == ["tench", "goldfish"]
    assert resolve_classnames(str(tmp_path / "index.json"), "k") == ["tench", "goldfish"]
