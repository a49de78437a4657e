"""Defences of the model against perturbed text (what ships in front of it on a device)."""
