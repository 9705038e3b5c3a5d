"""FSDP at Stable Diffusion scale: the SD 1.5 U-Net step compiles ahead of time over 8 CPU devices
with fsdp=8 from shapes alone (nothing of the 860M parameters is allocated), 1/8 of it per device."""

import os
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import config_check
from ldm_jax import sharding
from ldm_jax import weights
from ldm_jax.models import build
from ldm_jax.train import stages
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/sd15.py imports configs.common
# XLA:CPU's backend passes dominate the compile; the test checks partitioning and memory, not speed.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _abstract_weights(config, train_text):
  """The config's networks with a frozen VAE and CLIP text encoder as shapes (the stage would
  load or draw them)."""
  assert not train_text
  nets = build.networks_from_config(config.model)
  frozen = {'vae': build.abstract_params(nets['vae']),
            'text_encoder': build.abstract_params(nets['text_encoder'])}
  return weights.LDMWeights(nets['unet'], nets['vae'], nets['text_encoder'],
                            weights.scheduler_config(config.diffusion), frozen, None)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def test_sd15_step_compiles_ahead_of_time_with_fsdp_8(monkeypatch):
  monkeypatch.setattr(weights, 'ldm_weights', _abstract_weights)
  monkeypatch.setattr(stages.ldm.LDMStage, 'encode_empty_caption',
                      lambda self: jnp.zeros((1, 77, 768), jnp.bfloat16))
  config = config_check.load_config(os.path.join(ROOT, 'configs', 'sd15.py'))
  config.mesh = (('data', 1), ('fsdp', 8))
  config.model.remat = 'none'  # half the program to compile; remat does not change the state
  stage = stages.build_stage(config, None)
  tx, lr_schedule = state_lib.make_optimizer(config.optim, config.num_steps)
  mesh = sharding.make_mesh(config.mesh)
  rng = jax.random.key(0)
  abstract, frozen_shardings, update = step_lib.make_step(config, stage, tx, lr_schedule, mesh,
                                                          rng)

  sizes = state_lib.state_bytes(abstract)
  total = sizes['params'][0] + sizes['opt_state'][0]
  per_device = sizes['params'][1] + sizes['opt_state'][1]
  assert total > 859e6 * 4 * 3  # float32 U-Net weights, Adam's two moments
  assert per_device <= total / 8 * 1.05, (per_device, total)
  assert sharding.check_fsdp_sharded(abstract, mesh) > 0.99

  # One 8x8x4 latent per device, from precomputed VAE moments and text states: the U-Net's
  # partitioning and memory do not depend on the resolution, the compile time does.
  data = sharding.batch_sharding(mesh)
  batch = {'moments': jax.ShapeDtypeStruct((8, 8, 8, 8), jnp.float32, sharding=data),
           'context': jax.ShapeDtypeStruct((8, 77, 768), jnp.bfloat16, sharding=data),
           'drop': jax.ShapeDtypeStruct((8,), jnp.bool_, sharding=data)}
  replicated = jax.sharding.NamedSharding(mesh, sharding.P())
  start = time.time()
  _, memory = step_lib.compile_ahead(
      update, abstract, _with_shardings(stage.frozen, frozen_shardings), batch,
      jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated),
      compiler_options=FAST_COMPILE)
  print(f'sd15 fsdp=8 step: compiled in {time.time() - start:.0f} s; state per device '
        f'{ {k: round(v[1] / 2 ** 20) for k, v in sizes.items()} } MB; memory {memory}')
  everything = sum(t for t, _ in sizes.values()) + sharding.sharded_bytes(stage.frozen)[0]
  # XLA's own count of each device's inputs: the sharded state and frozen weights, and the batch.
  assert memory['arguments'] <= everything / 8 * 1.05, (memory, everything)


def test_compile_ahead_refuses_a_step_that_cannot_fit(monkeypatch):
  monkeypatch.setattr(step_lib, 'device_memory_limit', lambda: 2 ** 20)  # a 1 MiB device
  with pytest.raises(step_lib.OutOfMemoryError, match=r'needs 0\.\d+ GiB per device .* has 0\.00'):
    step_lib.compile_ahead(jax.jit(lambda x: x @ x), jax.ShapeDtypeStruct((1024, 1024), jnp.float32))
