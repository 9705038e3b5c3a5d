"""Config groups shared by every experiment config (the `model` group for now)."""

import ml_collections


def model(preset):
  """The `model` group: which networks (a preset of ldm_jax.models) and how they compute.

  Args:
    preset: 'sd15', 'sd21' or 'tiny'.
  """
  return ml_collections.ConfigDict({
      'preset': preset,
      'dtype': 'float32',  # compute dtype; 'bfloat16' on accelerators
      'param_dtype': 'float32',  # storage dtype (master weights)
      'attention_impl': 'xla',  # 'xla', 'jax' or 'cudnn' (flash attention on GPU)
      'remat': False,  # rematerialise each block in the backward pass
  })
