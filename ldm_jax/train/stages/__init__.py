"""The training stages, one `base.Stage` protocol each: ldm, vae, clip; `build_stage` picks one."""

from ldm_jax.train.stages import base
from ldm_jax.train.stages import clip
from ldm_jax.train.stages import ldm
from ldm_jax.train.stages import vae

Stage = base.Stage
STAGES = {'ldm': ldm.LDMStage, 'vae': vae.VAEStage, 'clip': clip.CLIPStage}


def build_stage(config, tokenizer):
  """The stage `config.stage` names, built from the config (its weights loaded)."""
  if config.stage not in STAGES:
    raise ValueError(f'config.stage={config.stage!r} is not one of {sorted(STAGES)}')
  return STAGES[config.stage](config, tokenizer)
