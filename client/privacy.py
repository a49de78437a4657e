"""DP-SGD with Opacus on the update that leaves the device, inside the one training loop.

``PrivateTraining`` is what ``models.training.fit`` calls when DP is on, and it changes only what
DP changes: Poisson-sampled batches, per-sample clipping (max-grad-norm) and Gaussian noise through
Opacus' ``DPOptimizer``, no global gradient clipping, and Opacus' hooks switched off while the
hardening's PGD search probes the model. The optimizer, learning rate, steps and objective are
the same as without DP.

- **Noise the server cannot replay.** The generator behind the noise and the Poisson sampler is
  seeded from the operating system's entropy (``secrets``), never from anything the server knows.
  ``dp-reproducible-noise = true`` seeds it from (run seed, round, partition) instead, so a
  simulation can be replayed; it is refused on real devices, and run.json records it. (Opacus'
  ``secure_mode`` would need torchcsprng, which has no wheel for this torch.)
- **Accounting with the rate actually used.** The ledger is Opacus' own RDP accountant, hooked to
  every optimizer step (noise-only steps included) at the sample rate of the Poisson loader,
  1 / ceil(n / batch). Epsilon is the RDP bound of the whole ledger across rounds.
- **The padding row stays zero.** Opacus' embedding grad sampler ignores ``padding_idx``: the
  padding row's per-sample gradients are zeroed before clipping (so they take no share of the
  clipping norm) and the row is reset after the noisy step (noise on a row that is never
  learned is post-processing).
"""

from __future__ import annotations

import contextlib
import secrets
import warnings

import numpy as np
import torch

from models.encoded import Batch, EncodedData
from models.errors import FedrexError
from models.run_settings import RunSettings


def epsilon_of(history: list, delta: float) -> float:
    if not history:  # no DP round yet: a device without Opacus reports 0
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


def poisson_sample_rate(n: int, batch_size: int) -> float:
    """The rate Opacus' Poisson loader samples each row with: 1 / (batches per epoch)."""
    return 1.0 / -(-n // min(batch_size, n))


class PrivateTraining:
    def __init__(self, settings: RunSettings, state, reproducible_seed: int):
        self.settings, self.state = settings, state
        self.seed = reproducible_seed if settings.dp_reproducible_noise else secrets.randbits(63)
        self.module = self.optimizer = self.accountant = None
        self.noise_multiplier = settings.noise_multiplier

    def attach(self, model, optimizer, data: EncodedData, batch_size: int, total_steps: int):
        """Wrap ``optimizer`` for DP-SGD; returns (endless Poisson batches, the DP optimizer)."""
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise FedrexError(f"{type(model).__name__} cannot be trained with Opacus: {errors[0]}")
        n = len(data)
        batch_size = min(batch_size, n)
        generator = torch.Generator().manual_seed(self.seed)
        rows = torch.utils.data.TensorDataset(data.batch(np.arange(n)).ids, torch.from_numpy(data.labels))
        loader = DPDataLoader.from_data_loader(
            torch.utils.data.DataLoader(rows, batch_size=batch_size, generator=generator))
        self.sample_rate = float(loader.sample_rate)
        if self.settings.target_epsilon > 0:  # spread the budget over every round this client could join
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.settings.target_epsilon, delta=self.settings.delta, sample_rate=self.sample_rate,
                steps=total_steps * self.settings.num_rounds, accountant="rdp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG: see the module docstring
            self.module = GradSampleModule(model)
            self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                         max_grad_norm=self.settings.max_grad_norm, expected_batch_size=batch_size,
                                         generator=generator)
        self.accountant = RDPAccountant()
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self.padded = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None]

        def batches():
            while True:
                for ids, labels in loader:
                    yield Batch(ids, labels)

        return batches(), self.optimizer

    @contextlib.contextmanager
    def hooks_off(self):
        """For the PGD search: its gradients must not reach the per-sample gradients."""
        self.module.disable_hooks()
        try:
            yield
        finally:
            self.module.enable_hooks()

    def empty_batch_loss(self, model, batch: Batch) -> torch.Tensor:
        """A Poisson draw can be empty: a zero loss through the model gives zero-size per-sample
        gradients, and the optimizer still adds noise (the step is noise only, as DP requires)."""
        return model(batch.ids).sum() * 0.0

    def step(self) -> None:
        for embedding in self.padded:
            if getattr(embedding.weight, "grad_sample", None) is not None:
                embedding.weight.grad_sample[:, embedding.padding_idx] = 0
        self.optimizer.step()
        with torch.no_grad():
            for embedding in self.padded:
                embedding.weight[embedding.padding_idx] = 0

    def finish(self) -> dict:
        """Detach Opacus from the model, extend the client's ledger; DP metrics for the reply."""
        self.module._close()
        self.state.dp_history = list(self.state.dp_history) + [tuple(h) for h in self.accountant.history]
        return {"epsilon": epsilon_of(self.state.dp_history, self.settings.delta),
                "noise_multiplier": float(self.noise_multiplier), "sample_rate": self.sample_rate}
