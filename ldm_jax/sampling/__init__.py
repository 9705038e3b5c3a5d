"""Sampling: where the weights come from, a run of seeded batches, and the files it writes."""
