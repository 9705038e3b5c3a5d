"""A printable summary of the networks a config names: parameter counts, dtypes, source."""

import jax
import jax.numpy as jnp

from ldm_jax import convert
from ldm_jax.models import build


def report(config):
  """Builds (shapes only) or loads the config's networks and describes them, one line each."""
  if config.get('init'):
    components = convert.load_diffusers(config.init, dtype=jnp.dtype(config.model.dtype),
                                        param_dtype=jnp.dtype(config.model.param_dtype))
    nets = {name: getattr(components, name) for name in ('unet', 'vae', 'text_encoder')}
    source = config.init
  else:
    modules = build.networks_from_config(config.model)
    nets = {name: (m, build.abstract_params(m)) for name, m in modules.items()}
    source = f'preset {config.model.preset} (shapes only, not initialised)'
  lines = [f'networks from {source}:']
  for name, (module, params) in nets.items():
    dtypes = sorted({str(jnp.dtype(x.dtype)) for x in jax.tree.leaves(params)})
    lines.append(f'  {name:13s} {type(module).__name__:22s} {build.count_params(params) / 1e6:9.2f}M '
                 f'params ({len(jax.tree.leaves(params))} tensors, {"/".join(dtypes)}), '
                 f'compute {jnp.dtype(module.config.dtype)}')
  return '\n'.join(lines)
