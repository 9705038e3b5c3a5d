"""Refuses `--config.a.b=v` overrides that name no config key, listing the valid ones."""

import importlib.util
import os


def load_config(spec):
  """The ConfigDict of 'path/to/config.py[:arg]' (what `--config` takes)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_checked_config', path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_override(argv, flag='config'):
  """The message for the first override in argv that names no key of the config, or None."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')), None)
  if spec is None and f'--{flag}' in argv[:-1]:
    spec = argv[argv.index(f'--{flag}') + 1]
  if spec is None:
    return None
  config = None
  for arg in argv:
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(flag) + 3:].split('=', 1)[0]
    if config is None:
      config = load_config(spec)
    node, walked = config, []
    for part in key.split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        where = '.'.join(walked) or 'the top level'
        return (f'unknown config key {key!r} in {arg!r}: {where} has {sorted(keys)}')
      node, walked = node[part], walked + [part]
  return None
