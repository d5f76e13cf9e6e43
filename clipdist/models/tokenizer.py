"""CLIP's byte-level BPE tokenizer (lower-cased, 49,408 tokens, context 77).

Text is cleaned (ftfy, HTML entities, whitespace), lower-cased, split into words, numbers
(one digit each) and punctuation runs; each piece is mapped byte by byte to printable
characters and merged by the learned BPE ranks. The last symbol of a word carries ``</w>``.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
from typing import Dict, List, Optional, Sequence, Tuple, Union

import regex  # the split pattern needs Unicode classes (\p{L}, \p{N}), which `re` lacks
import torch

try:
    import ftfy
except ImportError:  # optional: without it, mojibake, fullwidth punctuation and curly quotes stay unrepaired
    ftfy = None

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
VOCAB_SIZE = 49408
# The merges file has more merges than the vocabulary has room for: 256 bytes, 256 bytes + </w>,
# the merges, and the two special tokens make 49,408.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> Dict[int, str]:
    """A reversible byte -> character table that avoids whitespace and control characters:
    printable bytes map to themselves, the rest to code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table  # insertion order (printable bytes first) is the order of the first 256 ids


def clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # twice: captions are often double-escaped
    return " ".join(text.split()).lower()


def _pairs(word: Tuple[str, ...]) -> set:
    return set(zip(word, word[1:]))


class SimpleTokenizer:
    def __init__(self, bpe_path: Optional[str] = None):
        if bpe_path is None:
            data = importlib.resources.files("clipdist.models").joinpath(_BPE_FILE).read_bytes()
        else:
            with open(bpe_path, "rb") as f:
                data = f.read()
        lines = gzip.decompress(data).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.cache: Dict[str, str] = {SOT: SOT, EOT: EOT}
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]

    def bpe(self, token: str) -> str:
        """Merge the characters of one word, lowest rank first; returns space-separated symbols."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        while pairs:
            first, second = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if (first, second) not in self.bpe_ranks:
                break
            merged: List[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            pairs = _pairs(word)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for piece in _SPLIT.findall(clean(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.LongTensor:
        """[n, context_length] ids: SOT, the text, EOT, zero padding. Too-long texts are cut
        and end with EOT, so the text tower always finds one."""
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[: context_length - 1] + [self.eot_token_id]
            rows.append(ids + [0] * (context_length - len(ids)))
        # One tensor for the whole batch: per-row tensor writes cost more than the BPE itself.
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), context_length)


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.LongTensor:
    """Tokenize with the vendored CLIP vocabulary; see ``SimpleTokenizer.__call__``."""
    return _default_tokenizer()(texts, context_length)
