"""Training: the train state, the three stages, the update step and the loop."""
