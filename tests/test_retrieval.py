"""Retrieval recall@K: the chunked ranking against a brute-force float64 computation, ties, and
captions read one per line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipdist.data.pipeline import BadSample
from clipdist.eval.retrieval import TIE_TOLERANCE, LocalEmbeddings, recall_counts
from clipdist.eval.retrieval_data import decode_captions

KS = (1, 5, 10)


def random_set(seed: int, num_images: int = 60, dim: int = 24) -> LocalEmbeddings:
    """Normalised random embeddings; image i has 1 to 3 captions, each near its image."""
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=generator), dim=1)
    counts = torch.randint(1, 4, (num_images,), generator=generator)
    text_image = torch.repeat_interleave(torch.arange(num_images), counts)
    # Noise large enough that many captions miss their image's top 1, 5 and 10.
    texts = F.normalize(images[text_image] + 1.2 * torch.randn(len(text_image), dim, generator=generator), dim=1)
    return LocalEmbeddings(images, texts, text_image)


def brute_force_recalls(data: LocalEmbeddings, ks=KS) -> list[int]:
    """Hits at each K, image→text then text→image, from the full float64 score matrix sorted."""
    images, texts, text_image = data.images.double(), data.texts.double(), data.text_image
    scores = images @ texts.T  # [N, M]
    i2t_order = scores.argsort(dim=1, descending=True)
    t2i_order = scores.T.argsort(dim=1, descending=True)
    hits = []
    for k in ks:
        top_captions_owner = text_image[i2t_order[:, :k]]  # [N, k]: whose captions came back
        hits.append(int((top_captions_owner == torch.arange(len(images))[:, None]).any(dim=1).sum()))
    for k in ks:
        hits.append(int((t2i_order[:, :k] == text_image[:, None]).any(dim=1).sum()))
    return hits


def min_gap_to_correct(data: LocalEmbeddings) -> float:
    """The smallest |score - best correct score| of any wrong item: the float32 ranking must
    agree with float64 when this is far above TIE_TOLERANCE plus rounding."""
    scores = (data.images.double() @ data.texts.double().T)
    own = data.text_image[None, :] == torch.arange(len(data.images))[:, None]
    best_i2t = scores.masked_fill(~own, float("-inf")).max(dim=1).values
    i2t_gap = (scores - best_i2t[:, None]).abs().masked_fill(own, float("inf")).min()
    own_t2i = scores.T.gather(1, data.text_image[:, None])
    t2i_gap = (scores.T - own_t2i).abs().masked_fill(own.T, float("inf")).min()
    return float(min(i2t_gap, t2i_gap))


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_chunked_recall_equals_float64_brute_force(chunk):
    # Reference: float64 full-matrix sort. Exact hit counts: the data has no wrong item within
    # 3 × TIE_TOLERANCE (3e-5) of a correct score (checked), beyond the tolerance plus float32
    # rounding (~1e-7), so neither can move an item across the correct one.
    data = random_set(seed=0)
    assert min_gap_to_correct(data) > 3 * TIE_TOLERANCE
    counts = recall_counts(data, KS, chunk).tolist()
    reference = brute_force_recalls(data)
    assert counts == reference + [len(data.images), len(data.texts)]
    # The data is hard enough that recall grows with K and is not perfect at 10.
    assert reference[0] < reference[2] < len(data.images) and reference[3] < reference[5] < len(data.texts)


def test_identical_captions_of_other_images_do_not_push_a_hit_down():
    # Reference: by hand. Images 0 and 1 both carry the caption "e0"; for image 1 its own
    # caption ties with image 0's copy (exactly, or within float rounding when embedded apart).
    e = torch.eye(4)
    images = F.normalize(torch.stack([e[0] + 0.1 * e[1], e[0] - 0.1 * e[1], e[2], e[3]]), dim=1)
    almost_e0 = F.normalize(e[0] + 1e-7 * e[3], dim=0)  # what a different batch might round to
    texts = torch.stack([e[0], almost_e0, e[2], e[3]])
    data = LocalEmbeddings(images, texts, torch.tensor([0, 1, 2, 3]))
    counts = recall_counts(data, (1,), chunk=2).tolist()
    # image→text: every image finds one of its captions first (0 and 1 via the tie).
    # text→image: "e0" scores images 0 and 1 alike (0.995), so each copy finds its image first.
    assert counts == [4, 4, 4, 4]
    assert TIE_TOLERANCE < 1e-3


def test_captions_are_one_per_line():
    assert decode_captions({"txt": "a dog.\n\n  a brown dog on grass \n".encode()}) == ["a dog.", "a brown dog on grass"]
    assert decode_captions({"txt": b"one caption"}) == ["one caption"]
    for sample, reason in (({"txt": b"\n \n"}, "no_caption"), ({}, "no_caption"), ({"txt": b"\xff\xfe"}, "bad_caption")):
        with pytest.raises(BadSample) as info:
            decode_captions({"__url__": "u", "__key__": "k", **sample})
        assert info.value.reason == reason
