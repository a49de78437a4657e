"""FedREX ClientApp: local fine-tuning, adversarial hardening, DP, per-client evaluation."""
