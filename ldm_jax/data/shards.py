"""Shards read in place (`webdataset:<pattern>`, `parquet:<pattern>`): their names, the patterns
that list them and the per-shard index caches.

A pattern is a path with brace ranges and lists (`/data/laion/{00000..00127}.tar`,
`{train,extra}/*.parquet`) and glob wildcards; a relative one is under `data.data_dir`. Each
shard's index (where its records are) is built once and cached beside the shard when its folder
is writable, else under `$XDG_CACHE_HOME/ldm_jax/index` (~/.cache/ldm_jax/index, a file named
after a digest of the shard's absolute path). A cache holds the shard's name, size and
modification time and is rebuilt when they change.

An index also holds each record's image size (width, height) as it will be decoded, EXIF
orientation applied, read from the image's header (`image_size`): aspect-ratio buckets need it
before anything is decoded.
"""

import concurrent.futures
import glob
import hashlib
import io
import json
import logging
import os
import re
import struct
import time

import numpy as np
from PIL import Image

SCHEMES = ('webdataset', 'parquet')
INDEX_SUFFIX = '.ldm_jax_index.npz'
INDEX_VERSION = 2  # bump when an index's arrays change meaning: older caches are rebuilt
# (2: each record's image size)
HEADER_BYTES = 16 << 10  # an image's first bytes read for its header; most headers fit
UNKNOWN_SIZE = (-1, -1)  # the size of an image whose header cannot be read
_ORIENTATION = 0x0112  # the EXIF tag; 5-8 turn the image a quarter: width and height swap
# What a header that cannot be parsed raises (Image.open maps most to UnidentifiedImageError;
# EXIF and XMP parsing can raise the rest).
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError,
                  struct.error, Image.DecompressionBombError)
_BRACE = re.compile(r'\{([^{}]*)\}')
_RANGE = re.compile(r'(\d+)\.\.(\d+)')
_MAX_SHARDS_SHOWN = 5


def split_name(name):
  """('webdataset' or 'parquet', pattern) for a shard name, else None (a tfds name)."""
  if not isinstance(name, str) or ':' not in name:
    return None
  scheme, pattern = name.split(':', 1)
  return (scheme, pattern) if scheme in SCHEMES else None


def expand_braces(pattern):
  """Every path of a brace pattern, in order: '{a,b}' lists, '{000..127}' ranges (zero-padded to
  the endpoints' width when either has a leading zero; descending when start > end)."""
  m = _BRACE.search(pattern)
  if m is None:
    return [pattern]
  head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
  r = _RANGE.fullmatch(body)
  if r:
    a, b = r.groups()
    width = max(len(a), len(b)) if (a[0] == '0' and len(a) > 1) or (b[0] == '0' and len(b) > 1) \
        else 0
    step = 1 if int(a) <= int(b) else -1
    items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
  else:
    items = body.split(',')
  return [p for item in items for p in expand_braces(head + item + tail)]


def match(pattern, data_dir):
  """The shard files of `pattern` (relative: under `data_dir`), and the listed ones missing.

  Brace alternatives keep their order; a glob's matches are sorted; our index caches are never
  shards.

  Returns:
    (existing absolute paths without repeats, listed paths (no wildcard) that do not exist).
  """
  pattern = os.path.expanduser(pattern)
  if not os.path.isabs(pattern):
    pattern = os.path.join(data_dir, pattern)
  found, missing = [], []
  for path in expand_braces(pattern):
    if glob.has_magic(path):
      found += sorted(p for p in glob.glob(path) if os.path.isfile(p))
    elif os.path.isfile(path):
      found.append(path)
    else:
      missing.append(path)
  found = [os.path.abspath(p) for p in found if not p.endswith(INDEX_SUFFIX)]
  return list(dict.fromkeys(found)), missing


def resolve(scheme, pattern, data_dir):
  """The shard files a `<scheme>:<pattern>` name reads, or the reason there are none.

  Raises:
    FileNotFoundError: no file matches, or some the pattern lists by name do not exist.
  """
  problem = match_problem(scheme, pattern, data_dir)
  if problem:
    raise FileNotFoundError(problem)
  return match(pattern, data_dir)[0]


def match_problem(scheme, pattern, data_dir):
  """What is wrong with the files a `<scheme>:<pattern>` name matches (None: nothing)."""
  name = f'{scheme}:{pattern}'
  example = '/data/laion/{00000..00127}.tar' if scheme == 'webdataset' else '/data/laion/*.parquet'
  if not pattern.strip():
    return f'data.name {name!r} names no shards: give a pattern, e.g. {scheme}:{example}'
  if '://' in pattern:
    return (f'data.name {name!r}: shards are read as local files; mount the bucket (gcsfuse, '
            's3fs) and give the mounted path')
  paths, missing = match(pattern, data_dir)
  where = (f' (relative patterns are under data.data_dir {data_dir!r})'
           if not os.path.isabs(os.path.expanduser(pattern)) else '')
  if missing:
    return (f'data.name {name!r}: {len(missing)} of the shards it lists do not exist{where}: '
            f'{first(missing)}; fix the pattern, or use a glob (e.g. '
            f'{os.path.join(os.path.dirname(missing[0]), "*" + _ext(missing[0]))}) to take the '
            'shards that are there')
  if not paths:
    return (f'data.name {name!r}: no file matches the pattern{where}; it takes brace ranges '
            f'and globs, e.g. {scheme}:{example}')
  return None


def _ext(path):
  return os.path.splitext(path)[1]


def first(items, n=_MAX_SHARDS_SHOWN):
  """The first `n` of `items`, comma-separated, with how many more there are."""
  return ', '.join(items[:n]) + (f', ... ({len(items) - n} more)' if len(items) > n else '')


def fingerprint(paths):
  """A digest of the shards: their absolute paths, sizes and modification times."""
  h = hashlib.sha256()
  for path in paths:
    st = os.stat(path)
    h.update(f'{path}:{st.st_size}:{st.st_mtime_ns};'.encode())
  return h.hexdigest()


def display_names(paths):
  """Short names of the shards for logs and records: paths relative to their common folder."""
  if len(paths) == 1:
    return [os.path.basename(paths[0])]
  common = os.path.commonpath([os.path.dirname(p) for p in paths])
  return [os.path.relpath(p, common) for p in paths]


def image_size(data):
  """(width, height) of encoded image `data` as it will be decoded (EXIF orientation applied),
  from its header alone; UNKNOWN_SIZE when the header cannot be read (the decode will fail too,
  and skip the record)."""
  return _header_size(data) or UNKNOWN_SIZE


def image_size_at(read, size):
  """`image_size` of an image of `size` bytes of which `read(n)` gives the first n: reads its
  first HEADER_BYTES, and all of it only when the header runs past them (large ICC profiles or
  EXIF thumbnails, TIFFs with their directory at the end, WebP)."""
  head = read(min(size, HEADER_BYTES))
  found = _header_size(head)
  if found is None and size > len(head):
    found = _header_size(read(size))
  return found or UNKNOWN_SIZE


def _header_size(data):
  """(width, height), EXIF orientation applied, of the image `data` starts with; None when its
  header cannot be read from `data`."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      # The base method reads the EXIF the header holds: PNG's own decodes the whole image to
      # look for an eXIf chunk after the pixels (rare: PNG writers put it first).
      orientation = Image.Image.getexif(img).get(_ORIENTATION, 1)
  except _HEADER_ERRORS:
    return None
  return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def cache_dir():
  """Where indexes of shards in read-only folders go: $XDG_CACHE_HOME/ldm_jax/index."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ldm_jax', 'index')


def index_paths(path):
  """(beside the shard, in the cache directory): where the index of shard `path` may be."""
  digest = hashlib.sha256(path.encode()).hexdigest()[:16]
  return (path + INDEX_SUFFIX,
          os.path.join(cache_dir(), f'{digest}-{os.path.basename(path)}{INDEX_SUFFIX}'))


def identity(path, **options):
  """What an index of shard `path` depends on: the file (its name, size and modification time),
  the index format and the options it was built with (JSON-serialisable). The name, not the
  whole path: a folder mounted elsewhere on another host keeps the index beside its shards (the
  copy in the cache directory is found by the whole path)."""
  st = os.stat(path)
  return {'name': os.path.basename(path), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns,
          'version': INDEX_VERSION, 'options': options}


def cached_index(path, build, **options):
  """The index of shard `path`: the cached one when it is of this very file, else `build(path)`
  (a dict of numpy arrays), cached beside the shard or in the cache directory.

  Returns:
    (the index: a dict of numpy arrays, whether it was built now).
  """
  want = identity(path, **options)
  for where in index_paths(path):
    index = _load(where, want)
    if index is not None:
      return index, False
  index = build(path)
  for where in index_paths(path):
    if _writable(os.path.dirname(where)) and _save(where, index, want):
      break
  else:
    logging.warning('the index of %s could not be cached (neither its folder nor %s is '
                    'writable): it is rebuilt at every start', path, cache_dir())
  return index, True


def _load(where, want):
  """The index cached at `where` if it is there, readable and of `want`, else None."""
  try:
    with np.load(where, allow_pickle=False) as f:
      if json.loads(str(f['identity'])) != want:
        return None
      return {k: f[k] for k in f.files if k != 'identity'}
  except (OSError, ValueError, KeyError):  # missing, partly written or of an older layout
    return None


def _writable(folder):
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:
    return False
  return os.access(folder, os.W_OK)


def _save(where, index, want):
  """Writes the index atomically (several hosts may index the same shard at once)."""
  buf = io.BytesIO()
  np.savez(buf, identity=np.array(json.dumps(want)), **index)
  tmp = f'{where}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'wb') as f:
      f.write(buf.getvalue())
    os.replace(tmp, where)
    return True
  except OSError:
    if os.path.exists(tmp):
      os.remove(tmp)
    return False


def index_all(paths, index_one, what):
  """`index_one(path)` -> (index, built) for every shard, in threads (reading headers and
  footers waits on the disk, not the CPU); logs how many were built and how long it took."""
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:
    results = list(pool.map(index_one, paths))
  built = sum(b for _, b in results)
  if built:
    logging.info('indexed %d of %d %s in %.1f s (cached beside them, or in %s where their '
                 'folder is read-only)', built, len(paths), what, time.perf_counter() - start,
                 cache_dir())
  return [index for index, _ in results]
