"""The names and numbers that configure training, without torch: ``RunSettings`` validates with
them on every device, including one that has no torch (``client/onnx_client.py``). The losses they
configure live in ``models/objectives.py`` and the loop in ``models/training.py``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.errors import FedrexError

OPTIMIZERS = ("adamw", "sgd")  # of the shared weights, fresh every round (models.training.fit)
# where the ADV term's adversary searches (models.objectives): an L2 ball around each token's
# vector (PGD), or the convex hull of the vectors of the token and its WordNet synonyms (ASCC: the
# training loop is handed each token's candidates; not part of ObjectiveConfig, whose fields name
# the compression benchmark's rows)
ADV_SPACES = ("ball", "synonyms")


@dataclass
class ObjectiveConfig:
    kd: float = 0.0
    expl: float = 0.0
    # erasure consistency: on each row with its reference's rationale deleted, match the reference
    # model's probabilities (the deletion behaviour ERASER comprehensiveness measures)
    erasure: float = 0.0
    adv: float = 0.0
    temperature: float = 2.0
    adv_epsilon: float = 0.1  # relative to the mean token norm: 0.5 was measured to stop learning
    adv_steps: int = 2
    adv_ratio: float = 1.0  # share of batches that get the adversarial term (cost control)

    def validate(self) -> None:
        for name in ("kd", "expl", "erasure", "adv"):
            if getattr(self, name) < 0:
                raise FedrexError(f"objective weight {name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0 or self.adv_epsilon < 0 or self.adv_steps < 1:
            raise FedrexError("temperature must be > 0, adv-epsilon >= 0 and adv-steps >= 1")
        if not 0 <= self.adv_ratio <= 1:
            raise FedrexError(f"adv-ratio must be in [0, 1], got {self.adv_ratio}")

    def as_dict(self) -> dict:
        return asdict(self)
