"""Compact classifiers over MiniLM WordPiece ids: the FedREX student and the FastGRNN and PRADO
baselines. The MiniLM teacher lives in ``models/teacher.py`` (it needs transformers).

Every classifier exposes the same three-step interface, which is what lets one training loop,
one PGD attack, one HotFlip attack and one Captum attribution path serve all of them:

- ``embed(ids) -> [B, L, D]``: a differentiable per-token representation (the perturbation and
  attribution space);
- ``classify(emb, mask) -> [B, C]`` logits from that representation;
- ``candidate_embeddings(ids) -> [N, D]``: the representation of arbitrary token ids, used by
  HotFlip to score token swaps (a real table for embedding models, computed for PRADO).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.errors import FedrexError


HASH_PRIME = 2_147_483_647  # 2^31 - 1 (written out in forward(): torch.jit.script reads no globals)


class TokenClassifier(nn.Module):
    """Shared plumbing: ``forward(ids)`` = classify(embed(ids), ids != pad), and classify = the
    linear ``head`` over ``pool(emb, mask)``, the body's features. Every compact network compiles
    with ``torch.jit.script`` (the form a device runs, ``models.export``); ``features`` is what a
    device without torch runs as ONNX (``models.export.body_onnx_int8``)."""

    kind = "base"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(ids), ids != 0)  # 0 = [PAD]

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pool(self.embed(ids), ids != 0)

    def candidate_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.view(1, -1))[0]


def masked_attention_pool(hidden: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Attention pooling of ``hidden`` [B, L, D] with ``scores`` [B, L] over valid positions; rows
    with no valid token pool to zeros."""
    scores = scores.masked_fill(~mask, -1e4)
    weights = torch.softmax(scores, dim=-1) * mask
    return torch.einsum("bl,bld->bd", weights, hidden)


class VocabMap(nn.Module):
    """Maps the 30,522 MiniLM ids onto a pruned vocabulary of the K most frequent training tokens.

    Unknown or pruned tokens map to compact id 1 ([UNK]); padding maps to 0. Stored as int16, so
    the map costs 60 KB of the 1 MB budget instead of a 30,522-row embedding table.
    """

    def __init__(self, table: torch.Tensor, size: int):
        super().__init__()
        self.register_buffer("table", table.to(torch.int16))
        self.size = int(size)

    @classmethod
    def identity(cls, full_vocab_size: int = 30522) -> "VocabMap":
        return cls(torch.arange(full_vocab_size), full_vocab_size)

    @classmethod
    def pruned(cls, full_vocab_size: int, kept_ids) -> "VocabMap":
        kept = torch.as_tensor(kept_ids, dtype=torch.long)
        kept = kept[kept != 0]
        if len(kept) + 2 > torch.iinfo(torch.int16).max:
            raise FedrexError("pruned vocabulary too large for an int16 map")
        table = torch.ones(full_vocab_size, dtype=torch.int16)
        table[0] = 0
        table[kept] = torch.arange(2, len(kept) + 2, dtype=torch.int16)
        return cls(table, len(kept) + 2)

    @property
    def kept_ids(self) -> torch.Tensor:
        """Full-vocabulary ids in compact order (index 0 = [PAD], 1 = [UNK] stand-ins)."""
        order = torch.zeros(self.size, dtype=torch.long)
        known = self.table.long()
        order[known] = torch.arange(len(known))
        order[0], order[1] = 0, 100  # [PAD], [UNK]
        return order

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].long()


class FedrexStudent(TokenClassifier):
    """Pruned-vocabulary embedding (initialised from a projection of MiniLM's) -> two 1-D
    convolutions (the second residual) -> masked attention pooling -> linear head.

    Why this shape: the embedding is 80-90% of the parameters, so pruning the vocabulary to the
    tokens that occur in training and projecting MiniLM's 384-d vectors to 64-d keeps the teacher's
    lexical knowledge at a fraction of the size; convolutions give n-gram features that are cheap
    at batch 1 on a phone CPU, export cleanly to ONNX and are fast under double backward (the
    explanation objective differentiates through a gradient).
    """

    kind = "student"

    def __init__(self, num_labels: int, vocab_map: VocabMap, dim: int = 64, hidden: int = 128,
                 kernel: int = 3, dropout: float = 0.2):
        super().__init__()
        self.vocab = vocab_map
        self.embedding = nn.Embedding(vocab_map.size, dim, padding_idx=0)
        self.conv1 = nn.Conv1d(dim, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.scorer = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, num_labels)
        self.dropout = nn.Dropout(dropout)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.vocab(ids))

    def pool(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(1).to(emb.dtype)
        h = F.gelu(self.conv1(self.dropout(emb).transpose(1, 2))) * m
        h = (h + F.gelu(self.conv2(h))) * m
        return masked_attention_pool(h.transpose(1, 2), mask, self.scorer(h.transpose(1, 2)).squeeze(-1))

    def classify(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(emb, mask)))


class FastGRNNCell(nn.Module):
    """FastGRNN (Kusupati et al., 2018) with low-rank W = W1 W2 and U = U1 U2:

    z = sigmoid(Wx + Uh + b_z), h~ = tanh(Wx + Uh + b_h), h = (zeta (1 - z) + nu) * h~ + z * h_prev,
    zeta = sigmoid(zeta_raw), nu = sigmoid(nu_raw). One shared pre-activation Wx + Uh, two biases.
    """

    def __init__(self, input_dim: int, hidden: int, w_rank: int, u_rank: int):
        super().__init__()
        self.w1 = nn.Linear(input_dim, w_rank, bias=False)
        self.w2 = nn.Linear(w_rank, hidden, bias=False)
        self.u1 = nn.Linear(hidden, u_rank, bias=False)
        self.u2 = nn.Linear(u_rank, hidden, bias=False)
        self.bias_z = nn.Parameter(torch.ones(hidden))
        self.bias_h = nn.Parameter(torch.zeros(hidden))
        self.zeta_raw = nn.Parameter(torch.tensor(1.0))
        self.nu_raw = nn.Parameter(torch.tensor(-4.0))

    def forward(self, wx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        pre = wx + self.u2(self.u1(h))
        z = torch.sigmoid(pre + self.bias_z)
        h_tilde = torch.tanh(pre + self.bias_h)
        gate = torch.sigmoid(self.zeta_raw) * (1 - z) + torch.sigmoid(self.nu_raw)
        return gate * h_tilde + z * h


class FastGRNN(TokenClassifier):
    """FastGRNN over the same pruned-vocabulary tokens as the student; the last valid hidden state
    (padding steps keep the state unchanged) feeds a linear head."""

    kind = "fastgrnn"

    def __init__(self, num_labels: int, vocab_map: VocabMap, dim: int = 64, hidden: int = 128,
                 w_rank: int = 16, u_rank: int = 16):
        super().__init__()
        self.vocab = vocab_map
        self.embedding = nn.Embedding(vocab_map.size, dim, padding_idx=0)
        self.cell = FastGRNNCell(dim, hidden, w_rank, u_rank)
        self.head = nn.Linear(hidden, num_labels)
        self.hidden = hidden

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.vocab(ids))

    def pool(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        wx = self.cell.w2(self.cell.w1(emb))  # input projection for all steps at once
        h = emb.new_zeros(emb.shape[0], self.hidden)
        keep = mask.unsqueeze(-1).to(emb.dtype)
        for t in range(emb.shape[1]):
            h = keep[:, t] * self.cell(wx[:, t], h) + (1 - keep[:, t]) * h
        return h

    def classify(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(emb, mask))


class TernaryProjection(nn.Module):
    """PRADO's projection: each token id is hashed, with ``features`` universal hash functions,
    to a ternary vector in {-1, 0, 1}. Nothing is stored but 2 x features hash coefficients, so the
    model has no embedding table; hashing the WordPiece id is hashing the token string (1:1)."""

    def __init__(self, features: int, seed: int = 1234):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randint(1, HASH_PRIME, (features,), generator=gen))
        self.register_buffer("b", torch.randint(0, HASH_PRIME, (features,), generator=gen))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hashed = (ids.unsqueeze(-1) * self.a + self.b) % 2147483647  # HASH_PRIME
        return (hashed % 3).to(torch.float32) - 1.0


class Prado(TokenClassifier):
    """PRADO (Kaliamoorthi et al., 2019; seq_flow_lite defaults): ternary projection (512) ->
    bottleneck (64) -> for each n-gram width (2, 3) a value convolution and an attention
    convolution (64 channels each) -> projected attention as published: a softmax over time *per
    channel* of the attention map weights the value map -> linear head. ``embed`` returns the
    bottleneck output."""

    kind = "prado"

    def __init__(self, num_labels: int, features: int = 512, dim: int = 64, channels: int = 64,
                 ngrams: tuple[int, ...] = (2, 3), dropout: float = 0.2):
        super().__init__()
        self.projection = TernaryProjection(features)
        self.bottleneck = nn.Linear(features, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, n) for n in ngrams)
        self.attention = nn.ModuleList(nn.Conv1d(dim, channels, n) for n in ngrams)
        self.head = nn.Linear(channels * len(ngrams), num_labels)
        self.dropout = nn.Dropout(dropout)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bottleneck(self.projection(ids)))

    def pool(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(emb).transpose(1, 2) * mask.unsqueeze(1).to(emb.dtype)
        valid = mask.unsqueeze(1)  # [B, 1, L]
        pooled = []
        for conv, attention in zip(self.convs, self.attention):
            n = conv.kernel_size[0]
            padded = F.pad(x, (0, n - 1))  # right-pad: one output per token
            values = F.relu(conv(padded))  # [B, C, L]
            weights = torch.softmax(attention(padded).masked_fill(~valid, -1e4), dim=-1) * valid
            pooled.append((weights * values).sum(-1))  # rows with no valid token pool to zeros
        return torch.cat(pooled, dim=-1)

    def classify(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(emb, mask)))


ARCHITECTURES = {"student": FedrexStudent, "fastgrnn": FastGRNN, "prado": Prado}


def build_network(config: dict, vocab_map: VocabMap | None = None) -> TokenClassifier:
    """Build a compact network from its JSON-able config (``kind``, ``num_labels``, sizes...)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind not in ARCHITECTURES:
        raise FedrexError(f"unknown architecture {kind!r}: use one of {', '.join(ARCHITECTURES)}")
    full_vocab = config.pop("full_vocab_size", 30522)
    vocab_size = config.pop("vocab_size", full_vocab)
    if kind == "prado":
        return Prado(**config)
    if vocab_map is None:  # the real table arrives with the weights
        vocab_map = VocabMap(torch.zeros(full_vocab, dtype=torch.int16), vocab_size)
    return ARCHITECTURES[kind](vocab_map=vocab_map, **config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pca_init_embedding(target: nn.Embedding, teacher_rows: torch.Tensor) -> None:
    """Initialise ``target`` (K x d) with the top-d principal components of the teacher's rows for
    the same tokens in compact order (K x 384), scaled to unit mean norm: keeps the teacher's
    lexical geometry at a sixth of the width. Row 0 ([PAD]) stays zero."""
    with torch.no_grad():
        centred = teacher_rows - teacher_rows.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        projected = centred @ v[: target.embedding_dim].T
        target.weight.copy_(projected / projected.norm(dim=1).mean().clamp_min(1e-6))
        target.weight[0].zero_()
