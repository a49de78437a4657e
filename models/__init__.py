"""FedREX models package: data loading, tokenization, networks, objectives, attacks, export.

Kept import-free on purpose: the client imports single submodules so that a small ARM device
never pays for what it does not use (captum, transformers, onnx are imported only where needed).
"""
