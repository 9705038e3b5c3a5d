"""Evaluation: reading generated images back (shapes prompt fidelity)."""
