"""Remat policies (none, full, save_dots): the same gradients, and the config's choice reaches the
U-Net's and the text encoder's blocks."""

import os
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import build
from ldm_jax.models import layers
from ldm_jax.models import text_encoder
from ldm_jax.models import unet

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_NETWORKS = {
    'unet': (lambda **kw: unet.UNet2DConditionModel(unet.UNetConfig.tiny(**kw)),
             lambda: (np.random.default_rng(0).standard_normal((2, 8, 8, 4), np.float32),
                      np.array([1, 999]),
                      np.random.default_rng(1).standard_normal((2, 77, 32), np.float32))),
    'text_encoder': (lambda **kw: text_encoder.CLIPTextModel(text_encoder.TextEncoderConfig.tiny(**kw)),
                     lambda: (np.random.default_rng(0).integers(0, 1000, (2, 77)),)),
}


def _loss(module, params, args):
  out = module.apply({'params': params}, *args)
  return jnp.mean(jnp.square(getattr(out, 'last_hidden_state', out)))


def _remat_policies(jaxpr):
  """The `policy` of every remat equation in a jaxpr and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('checkpoint', 'remat2'):  # the name differs across JAX versions
      found.append(eqn.params['policy'])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _remat_policies(sub)
  return found


@pytest.mark.parametrize('name', list(_NETWORKS))
def test_every_policy_gives_the_same_gradients(name):
  make, inputs = _NETWORKS[name]
  args = inputs()
  params = build.random_params(make(), 1)
  grads = {}
  for policy in layers.REMAT_POLICIES:
    module = make(remat=policy)
    grads[policy] = jax.jit(jax.grad(lambda p, m=module: _loss(m, p, args)))(params)
    policies = _remat_policies(jax.make_jaxpr(lambda p, m=module: _loss(m, p, args))(params).jaxpr)
    expected = {'none': [], 'full': [None],
                'save_dots': [jax.checkpoint_policies.dots_with_no_batch_dims_saveable]}[policy]
    assert sorted(set(map(repr, policies))) == list(map(repr, expected)), (policy, policies)
  for policy in ('full', 'save_dots'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads['none'], grads[policy])


def test_config_remat_reaches_the_networks():
  model = common.model('tiny')
  for value, policy in (('save_dots', 'save_dots'), ('full', 'full'), ('none', 'none'),
                        ('True', 'full'), ('false', 'none')):  # --config.model.remat=True
    model.remat = value
    nets = build.networks_from_config(model)
    assert nets['unet'].config.remat == nets['text_encoder'].config.remat == policy, value
  assert unet.UNetConfig.tiny(remat=True).remat == 'full'  # a saved config.json's bool
  with pytest.raises(ValueError, match="'offload' is not one of"):
    unet.UNetConfig.tiny(remat='offload')
