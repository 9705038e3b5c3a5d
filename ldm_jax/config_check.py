"""Start-up checks of what a user typed: the config file and its argument, `--config.a.b=v`
overrides that name no config key (listing the valid ones), folders a run will write to."""

import importlib.util
import os


def load_config(spec):
  """The ConfigDict of 'path/to/config.py[:arg]' (what `--config` takes).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the config refuses its argument (an unknown stage or variant).
  """
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_checked_config', path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _spec(argv, flag):
  """The value of --flag in argv ('--config=x' or '--config x'), or None."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')), None)
  if spec is None and f'--{flag}' in argv[:-1]:
    spec = argv[argv.index(f'--{flag}') + 1]
  return spec


def startup_problem(argv, flag='config'):
  """What is wrong with the config argv names, in one message, or None.

  Run before absl parses the flags: its config loader reports a missing file or a refused
  variant as a traceback, and an unknown override without the valid keys.
  """
  spec = _spec(argv, flag)
  if spec is None:
    return None
  try:
    config = load_config(spec)
  except (FileNotFoundError, ValueError) as e:
    return str(e)
  return unknown_override(argv, flag, config)


def unknown_override(argv, flag='config', config=None):
  """The message for the first override in argv that names no key of the config, or None."""
  spec = _spec(argv, flag)
  if spec is None:
    return None
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


def is_remote(path):
  """Whether `path` is a URL such as gs://bucket/run (not checked on the local disk)."""
  return '://' in str(path)


def folder_problem(path, what):
  """Why the folder `path` cannot be written (created where missing), or None.

  Looks at the nearest existing parent and writes nothing. Remote paths (gs://) pass.

  Args:
    path: the folder a run will write to.
    what: how the user named it, for the message: '--workdir', '--out'.
  """
  if not path or is_remote(path):
    return None if path else f'{what} is empty: name a folder'
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    return f'{what} {path!r} is a file, not a folder: pick another path'
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return (f'{what} {path!r} cannot be created: {existing!r} is a file, not a folder; pick '
            'another path')
  read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
  if read_only or not os.access(existing, os.W_OK | os.X_OK):
    why = 'is on a read-only filesystem' if read_only else 'is not writable by this user'
    verb = 'be written to' if existing == path else 'be created'
    return (f'{what} {path!r} cannot {verb}: {existing!r} {why}; pick a folder you can write '
            '(or fix its permissions)')
  return None
