"""Tokenized examples plus per-example side information, batched by length.

Side information (teacher logits, teacher attributions) rides along with each example so that a
shuffled batch always carries the right teacher signal for the right row. torch is imported only
to build batches: a device without torch holds its rows in an EncodedData too.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from models.errors import FedrexError
from models.tokenizer import WordPieceTokenizer

if TYPE_CHECKING:
    import torch


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L] int64, padded with 0
    labels: torch.Tensor  # [B]
    teacher_logits: torch.Tensor | None = None  # [B, C]
    teacher_attr: torch.Tensor | None = None  # [B, L] |attribution| per token, 0 where unknown
    has_attr: torch.Tensor | None = None  # [B] bool: which rows carry a teacher attribution
    attr_labels: torch.Tensor | None = None  # [B] the label each reference map explains
    index: torch.Tensor | None = None  # [B] positions in the EncodedData
    erased_ids: torch.Tensor | None = None  # [B, L'] each row with its reference rationale deleted
    erased_probs: torch.Tensor | None = None  # [B, C] the reference model's probabilities on them

    @property
    def mask(self) -> torch.Tensor:
        return self.ids != 0


@dataclass
class EncodedData:
    ids: list[np.ndarray]
    labels: np.ndarray
    texts: list[str]
    teacher_logits: np.ndarray | None = None
    teacher_attr: list[np.ndarray | None] | None = None
    attr_labels: np.ndarray | None = None  # the label each teacher_attr map explains (default: teacher's argmax)
    erased_ids: list[np.ndarray] | None = None  # per row: its ids without the reference's rationale
    erased_probs: np.ndarray | None = None  # [N, C] the reference model's probabilities on erased_ids

    @classmethod
    def from_texts(cls, texts: list[str], labels, tokenizer: WordPieceTokenizer) -> "EncodedData":
        texts = list(texts)
        ids = [np.asarray(row, dtype=np.int64) for row in tokenizer.encode_ids(texts)]
        return cls(ids, np.asarray(labels, dtype=np.int64), texts)

    @classmethod
    def from_dataset(cls, dataset, tokenizer: WordPieceTokenizer) -> "EncodedData":
        return cls.from_texts(dataset["text"], dataset["label"], tokenizer)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "EncodedData":
        index = np.asarray(index, dtype=np.int64)
        return EncodedData(
            [self.ids[i] for i in index], self.labels[index], [self.texts[i] for i in index],
            None if self.teacher_logits is None else self.teacher_logits[index],
            None if self.teacher_attr is None else [self.teacher_attr[i] for i in index],
            None if self.attr_labels is None else self.attr_labels[index],
            None if self.erased_ids is None else [self.erased_ids[i] for i in index],
            None if self.erased_probs is None else self.erased_probs[index],
        )

    def batch(self, index) -> Batch:
        import torch

        index = np.asarray(index, dtype=np.int64)
        batch = Batch(torch.from_numpy(_padded([self.ids[i] for i in index])), torch.from_numpy(self.labels[index]),
                      index=torch.from_numpy(index))
        width = batch.ids.shape[1]
        if self.erased_ids is not None:
            batch.erased_ids = torch.from_numpy(_padded([self.erased_ids[i] for i in index]))
            batch.erased_probs = torch.from_numpy(self.erased_probs[index]).float()
        if self.teacher_logits is not None:
            batch.teacher_logits = torch.from_numpy(self.teacher_logits[index]).float()
        if self.teacher_attr is not None:
            attr = np.zeros((len(index), width), dtype=np.float32)
            has = np.zeros(len(index), dtype=bool)
            for row, i in enumerate(index):
                if self.teacher_attr[i] is not None:
                    attr[row, : len(self.teacher_attr[i])] = self.teacher_attr[i]
                    has[row] = True
            batch.teacher_attr, batch.has_attr = torch.from_numpy(attr), torch.from_numpy(has)
            explained = (self.attr_labels if self.attr_labels is not None
                         else self.teacher_logits.argmax(1) if self.teacher_logits is not None else None)
            if explained is None:
                raise FedrexError("reference attributions need attr_labels or teacher logits (the label they explain)")
            batch.attr_labels = torch.from_numpy(np.asarray(explained)[index]).long()
        return batch

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, bucket: bool = True):
        """Yield Batches. With ``bucket``, rows of similar length are grouped (in shuffled chunks
        of 50 batches) so little compute is wasted on padding; batch order is still shuffled."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        if bucket:
            lengths = np.array([len(self.ids[i]) for i in order])
            chunk = batch_size * 50
            order = np.concatenate([order[s:s + chunk][np.argsort(lengths[s:s + chunk], kind="stable")]
                                    for s in range(0, n, chunk)]) if n else order
        groups = [order[s:s + batch_size] for s in range(0, n, batch_size)]
        if shuffle:
            np.random.default_rng(seed + 1).shuffle(groups)
        for group in groups:
            yield self.batch(group)
