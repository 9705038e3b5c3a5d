"""ldm_jax: latent diffusion models of the Stable Diffusion family in JAX/Flax."""

__version__ = '0.1.0'
