"""DP-SGD with Opacus on the update that leaves the device.

Per-sample clipping (max-grad-norm) and Gaussian noise come from Opacus' PrivacyEngine with
Poisson sampling, so its RDP accountant's guarantee applies. The ledger of every round's
(noise multiplier, sample rate, steps) is kept in the client's state, and epsilon is the RDP
bound of the whole ledger: it grows across rounds as the device keeps contributing.
Adversarial hardening works under DP: the PGD search runs with Opacus' hooks disabled, so only
the final loss contributes per-sample gradients.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn import functional as F

from models.encoded import EncodedData
from models.errors import FedrexError
from models.objectives import ObjectiveConfig, pgd_perturbation
from models.run_settings import RunSettings


def epsilon_of(history: list, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


def dp_fit(model, data: EncodedData, settings: RunSettings, objective: ObjectiveConfig, seed: int, state) -> dict:
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise FedrexError(f"{type(model).__name__} cannot be trained with Opacus: {errors[0]}")
    n = len(data)
    batch_size = min(settings.batch_size, n)
    sample_rate = batch_size / n
    steps = min(settings.local_max_steps, max(1, int(round(settings.local_epochs * n / batch_size))))
    noise = settings.noise_multiplier
    if settings.target_epsilon > 0:  # spread the budget over every round this client could join
        noise = get_noise_multiplier(target_epsilon=settings.target_epsilon, delta=settings.delta,
                                     sample_rate=sample_rate, steps=steps * settings.num_rounds, accountant="rdp")
    ids = data.batch(np.arange(n)).ids
    dataset = torch.utils.data.TensorDataset(ids, torch.from_numpy(data.labels))
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr * 10, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
            max_grad_norm=settings.max_grad_norm, poisson_sampling=True, noise_generator=generator)
    private.train()
    done, losses = 0, []
    while done < steps:
        for ids_batch, labels in loader:
            if done >= steps:
                break
            done += 1
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:  # Poisson sampling can draw an empty batch: noise-only step
                optimizer.step()
                continue
            mask = ids_batch != 0
            emb = model.embed(ids_batch)
            loss = F.cross_entropy(model.classify(emb, mask), labels)
            if objective.adv > 0 and np.random.default_rng(seed + done).random() < objective.adv_ratio:
                private.disable_hooks()
                delta = pgd_perturbation(model, emb, mask, labels, None, objective.adv_epsilon, objective.adv_steps)
                private.enable_hooks()
                loss = loss + objective.adv * F.cross_entropy(model.classify(emb + delta, mask), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    state.dp_history = list(state.dp_history) + [(float(noise), float(sample_rate), int(done))]
    return {"steps": done, "loss": float(np.mean(losses)) if losses else 0.0,
            "epsilon": epsilon_of(state.dp_history, settings.delta), "noise_multiplier": float(noise)}
