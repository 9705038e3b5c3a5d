"""Weights in and out: diffusers folders (and, later, original single-file checkpoints)."""

from ldm_jax.convert.diffusers import Components
from ldm_jax.convert.diffusers import ConversionError
from ldm_jax.convert.diffusers import load_diffusers
from ldm_jax.convert.diffusers import save_diffusers
from ldm_jax.convert.tables import WeightsMismatchError
