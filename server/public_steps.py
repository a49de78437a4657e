"""Server learning on public data: after each aggregation the server takes ``server-steps`` steps
of the clients' own objective on labelled rows of the data the start model was distilled from
(``distill-dataset``, train split), which the server holds anyway (Mai et al., "Federated Learning
with Server Learning", 2023: a small server dataset pulls a non-IID federation back toward the
population). No user text reaches the server: the rows are public, and the step is a
post-processing of the aggregate (a DP guarantee of the clients' updates is untouched).

Why: the users' rows carry their own label mixes and vocabulary (Sentiment140's training tweets
are 65.5% positive, the later held-out ones 50.5%), and rounds of averaged fine-tunes drift toward
them; the central reference shows what mixing the public rows back buys (``benchmarks/
personalization.py``, README). Each round draws its rows from (seed, round), so the same config
and seed take the same steps and a resumed run repeats them exactly.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from models.datasets import cached_text_dataset
from models.encoded import EncodedData
from models.run_settings import RunSettings
from models.tokenizer import client_tokenizer
from models.training import fit, seed_everything


class PublicDataSteps:
    """``steps(shared, global_round)`` -> the shared tensors after the round's server steps, in
    the dtypes they came in; the model's other tensors (``frozen``) stay as the artifact has them."""

    def __init__(self, settings: RunSettings, model: torch.nn.Module, frozen: dict, normalizer: bytes | None):
        self.settings = settings
        self.model = copy.deepcopy(model)  # the server's own copy: nothing else sees its weights move
        self.frozen = {k: torch.as_tensor(np.asarray(v)) for k, v in frozen.items()}
        self.tokenizer = client_tokenizer(settings.max_length, normalizer)  # the rows the clients would see
        self.rows = cached_text_dataset(settings.distill_dataset, "train", settings.data_dir or None)[0]
        # the clients' objective without the terms that need a start model's answers or maps
        self.objective = settings.replace(start_kd=0.0, expl_weight=0.0, expl_erasure=0.0).objective()
        self.seconds = 0.0  # of the last call

    def rows_for(self, global_round: int) -> np.ndarray:
        """The public rows round ``global_round`` trains on: a draw seeded by (seed, round)."""
        need = self.settings.server_steps * self.settings.batch_size
        rng = np.random.default_rng([self.settings.seed, global_round, 3])
        return rng.choice(len(self.rows), size=need, replace=need > len(self.rows))

    def __call__(self, shared: dict[str, np.ndarray], global_round: int) -> dict[str, np.ndarray]:
        started = time.time()
        picked = self.rows.select(self.rows_for(global_round).tolist())
        data = EncodedData.from_texts(list(picked["text"]), np.asarray(picked["label"]), self.tokenizer)
        self.model.load_state_dict({**self.frozen, **{k: torch.from_numpy(np.array(v)) for k, v in shared.items()}})
        seed = int(np.random.default_rng([self.settings.seed, global_round, 4]).integers(2**31))
        seed_everything(seed)  # dropout draws from torch's global generator
        fit(self.model, data, self.objective, epochs=1.0, max_steps=self.settings.server_steps,
            batch_size=self.settings.batch_size, lr=self.settings.lr, seed=seed,
            optimizer=self.settings.client_optimizer)
        state = self.model.state_dict()
        self.seconds = time.time() - started
        return {k: state[k].detach().numpy().astype(v.dtype) for k, v in shared.items()}
