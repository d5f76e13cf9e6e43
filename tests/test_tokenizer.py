"""CLIP BPE tokenizer: ids must equal open_clip's tokenizer (an independent copy of OpenAI's),
exactly, on text that exercises cleaning, Unicode, splitting and truncation."""

from __future__ import annotations

import random

import pytest
import torch

from clipdist.models import SimpleTokenizer, tokenize
from clipdist.models import tokenizer as tokenizer_module

open_clip = pytest.importorskip("open_clip", reason="open_clip (test extra) is the reference tokenizer")

TRICKY = [
    "a photo of a cat.",
    "A Photo Of A CAT!!!",
    "Héllo wörld — naïve café, Ærøskøbing, São Paulo",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 😀🐱👍🏽 and flags 🇫🇷🇯🇵, family 👨‍👩‍👧",
    "don't it's we'll I'M they've she'd you're O'Neil's",
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;quoted&quot; &#39;x&#39; &eacute;",
    "tabs\tand\nnewlines\r\n   and    many     spaces   ",
    "3.14159 1,000,000 42nd 2024-01-01 v1.2.3 #1 @user $5.99 100%",
    "C++/C# -- e-mail: foo@bar.com https://example.com/a?b=c&d=e",
    "...!!!???;;;:::()[]{}<>|\\/~`^_=+*",
    "mojibake: cafÃ© donâ€™t",
    "",
    "   ",
    "x",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def test_special_tokens_and_vocab_size():
    tok = SimpleTokenizer()
    assert tok.vocab_size == 49408, "OpenAI CLIP vocabulary size"
    assert tok.sot_token_id == 49406 and tok.eot_token_id == 49407, "OpenAI CLIP SOT/EOT ids"
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_open_clip(text):
    ours, reference = tokenize(text), open_clip.tokenize(text)
    assert ours.dtype == torch.long and ours.shape == (1, 77)
    assert torch.equal(ours, reference), f"{text!r}: exact ids vs open_clip.tokenize"


def test_random_unicode_matches_open_clip():
    """Seeded fuzz over mixed scripts, digits, punctuation, apostrophes and whitespace."""
    pool = "abcXYZ019 '\t\n.,!?-_&;#éüßøçÅ日本中文한국😀👍🏽\u200d\u00a0\u3000ﬁ①½"
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    assert torch.equal(tokenize(texts), open_clip.tokenize(texts)), "exact ids vs open_clip.tokenize on 300 random strings"


def test_empty_string_is_sot_eot():
    assert tokenize("")[0, :3].tolist() == [49406, 49407, 0]


@pytest.mark.parametrize("context_length", [77, 16, 2])
def test_truncation_keeps_eot_last(context_length):
    text = "a very long caption " * 50
    ours = tokenize([text, "short"], context_length=context_length)
    assert ours.shape == (2, context_length)
    assert ours[0, 0] == 49406 and ours[0, -1] == 49407, "truncated rows start with SOT and end with EOT"
    assert torch.equal(ours, open_clip.tokenize([text, "short"], context_length=context_length)), "exact ids vs open_clip"


def test_decode_round_trip():
    tok = SimpleTokenizer()
    assert tok.decode(tok.encode("Héllo wörld 😀 a photo of 2 cats")) == "héllo wörld 😀 a photo of 2 cats "


def test_without_ftfy_clean_text_is_unchanged(monkeypatch):
    """ftfy is optional: without it only ftfy's repairs (mojibake, fullwidth punctuation, curly
    quotes) are lost, so text that ftfy leaves alone keeps its ids."""
    ftfy = pytest.importorskip("ftfy")
    texts = [t for t in TRICKY if ftfy.fix_text(t) == t]
    monkeypatch.setattr(tokenizer_module, "ftfy", None)
    assert torch.equal(SimpleTokenizer()(texts), open_clip.tokenize(texts)), "exact ids vs open_clip"


def test_context_length_below_two_is_rejected():
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        tokenize("a", context_length=1)
