"""Weights in and out: diffusers folders, original single-file checkpoints, Orbax folders."""

from ldm_jax.convert.ckpt import UnsafePickleError
from ldm_jax.convert.diffusers import Components
from ldm_jax.convert.diffusers import ConversionError
from ldm_jax.convert.diffusers import load_diffusers
from ldm_jax.convert.diffusers import save_diffusers
from ldm_jax.convert.orbax_io import load_orbax
from ldm_jax.convert.orbax_io import save_orbax
from ldm_jax.convert.single_file import load_single_file
from ldm_jax.convert.single_file import save_single_file
from ldm_jax.convert.tables import WeightsMismatchError
