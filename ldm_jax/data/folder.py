"""A folder of the user's images with captions, in the usual conventions.

Captions come from `metadata.jsonl` or `metadata.csv` (columns `file_name` and `text`, as
Hugging Face's imagefolder reads them) or from a sidecar `name.txt` beside each `name.jpg`.
Images are kept as their file bytes; the scan decodes each one as the loader will and leaves
out (and names) those that do not decode, and names tiny ones (kept: `data.min_image_size`
skips them at training time).
"""

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os

from ldm_jax.data import images as images_lib

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
# Images whose shorter side is below this are named at build time: whatever the training
# resolution, they are upsampled a lot (the loader counts and warns about > 4x at train time).
TINY_SIDE = 16
_FILE_LIST_LIMIT = 20_000  # a source record keeps its file list (to name changes) up to this


@dataclasses.dataclass
class ScanStats:
  """What a scan found and what it had to leave out."""
  images: int = 0
  no_caption: list = dataclasses.field(default_factory=list)
  empty_caption: list = dataclasses.field(default_factory=list)
  not_utf8: list = dataclasses.field(default_factory=list)
  missing_file: list = dataclasses.field(default_factory=list)
  bad_image: list = dataclasses.field(default_factory=list)  # 'name (why)'
  tiny: list = dataclasses.field(default_factory=list)  # 'name (WxH)', kept

  def summary(self):
    parts = [f'{self.images} images with captions']
    for name in ('no_caption', 'empty_caption', 'not_utf8', 'missing_file', 'bad_image'):
      items = getattr(self, name)
      if items:
        parts.append(f'{len(items)} skipped ({name.replace("_", " ")}: {_first(items)})')
    if self.tiny:
      parts.append(f'{len(self.tiny)} tiny, shorter side < {TINY_SIDE} px (kept and upsampled '
                   f'in training; data.min_image_size={TINY_SIDE} skips them: '
                   f'{_first(self.tiny)})')
    return '; '.join(parts)


def _first(items, n=5):
  return ', '.join(items[:n]) + (', ...' if len(items) > n else '')


def scan(src, keep_empty_captions=False):
  """Lists (relative path, caption) pairs of a folder, with what was skipped.

  Args:
    src: the folder.
    keep_empty_captions: keep images whose caption is empty (unconditional training data)
      instead of skipping them.

  Returns:
    (list of (relative file name, caption), ScanStats).
  """
  if not os.path.isdir(src):
    raise FileNotFoundError(f'image folder {src!r} does not exist')
  stats = ScanStats()
  if os.path.isfile(os.path.join(src, 'metadata.jsonl')):
    rows = _jsonl_rows(os.path.join(src, 'metadata.jsonl'))
  elif os.path.isfile(os.path.join(src, 'metadata.csv')):
    rows = _csv_rows(os.path.join(src, 'metadata.csv'))
  else:
    rows = list(_sidecar_rows(src, stats))
  pairs = []
  for name, text in rows:
    path = os.path.join(src, name)
    if not os.path.isfile(path):
      stats.missing_file.append(name)
    elif text is None:
      stats.no_caption.append(name)
    elif not text.strip() and not keep_empty_captions:
      stats.empty_caption.append(name)
    elif _checked(path, name, stats):
      pairs.append((name, text.strip()))
  stats.images = len(pairs)
  if not pairs:
    raise ValueError(f'no captioned images in {src!r}: give metadata.jsonl / metadata.csv with '
                     f'file_name and text, or a name.txt beside each image ({stats.summary()})')
  logging.info('folder %s: %s', src, stats.summary())
  return pairs, stats


def _checked(path, name, stats):
  """Whether the image decodes (else it is named in `stats.bad_image`); names tiny ones."""
  try:
    size = images_lib.check(path)
  except images_lib.DECODE_ERRORS as e:
    stats.bad_image.append(f'{name} ({images_lib.describe(e, path)})')
    return False
  if min(size) < TINY_SIDE:
    stats.tiny.append(f'{name} ({size[0]}x{size[1]})')
  return True


def _read_text(path):
  """The file as text (UTF-8, a BOM allowed), or a ValueError naming the file and byte."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    raise ValueError(f'{path} line {line}: not UTF-8 (byte {raw[e.start]:#04x}); save it as '
                     'UTF-8') from None


def _jsonl_rows(path):
  """(file_name, text or None) of each line; a bad line is a ValueError naming it."""
  rows = []
  for number, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} line {number}: {e.msg.removesuffix(" at")} (column {e.colno}); '
                       'each line must be a JSON object like {"file_name": "a.png", "text": '
                       '"a caption"}') from None
    if not isinstance(row, dict) or not isinstance(row.get('file_name'), str):
      what = (f'keys {sorted(row)}' if isinstance(row, dict) else f'a JSON {type(row).__name__}')
      raise ValueError(f'{path} line {number}: needs a "file_name" string (and "text"); it has '
                       f'{what}')
    text = row.get('text')
    if text is not None and not isinstance(text, str):
      raise ValueError(f'{path} line {number}: "text" is a {type(text).__name__}, not a string')
    rows.append((row['file_name'], text))
  return rows


def _csv_rows(path):
  """(file_name, text or None) of each row; missing columns are a ValueError naming them."""
  reader = csv.DictReader(io.StringIO(_read_text(path), newline=''))
  try:
    columns = reader.fieldnames or []
    if 'file_name' not in columns or 'text' not in columns:
      raise ValueError(f'{path} has columns {columns}; it needs a header row with file_name and '
                       'text (file_name,text)')
    return [(r['file_name'], r['text']) for r in reader]
  except csv.Error as e:
    raise ValueError(f'{path} line {reader.line_num}: {e}') from None


def _sidecar_rows(src, stats):
  for root, _, files in os.walk(src):
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      rel = os.path.relpath(os.path.join(root, name), src)
      txt = os.path.join(root, stem + '.txt')
      if not os.path.isfile(txt):
        yield rel, None
        continue
      with open(txt, 'rb') as f:
        raw = f.read()
      try:
        yield rel, raw.decode('utf-8')
      except UnicodeDecodeError:
        stats.not_utf8.append(os.path.relpath(txt, src))


def fingerprint(src, options, skip=None):
  """What a build of `src` depends on: its absolute path, `options` and every file's relative
  path, size and modification time (a file added, removed or rewritten changes it).

  Args:
    src: the folder.
    options: the build's options (JSON-serialisable).
    skip: a folder inside `src` to leave out (the data_dir, when it is there).

  Returns:
    A JSON-serialisable dict; `changes(old, new)` says how two differ.
  """
  src = os.path.abspath(src)
  skip = os.path.abspath(skip) if skip else None
  files = []
  for root, dirs, names in os.walk(src):
    dirs[:] = sorted(d for d in dirs if os.path.join(root, d) != skip)
    for name in sorted(names):
      st = os.stat(os.path.join(root, name))
      files.append([os.path.relpath(os.path.join(root, name), src), st.st_size, st.st_mtime_ns])
  digest = hashlib.sha256(json.dumps([options, files]).encode()).hexdigest()
  record = {'src': src, 'options': options, 'num_files': len(files), 'digest': digest}
  if len(files) <= _FILE_LIST_LIMIT:
    record['files'] = files
  return record


def changes(old, new):
  """How source record `new` differs from `old`, in words ('' when the same)."""
  if old.get('digest') == new['digest'] and old.get('src') == new['src']:
    return ''
  if old.get('src') != new['src']:
    return f'it was built from {old.get("src")}'
  if old.get('options') != new['options']:
    return f'it was built with {old.get("options")}, now {new["options"]}'
  if 'files' not in old or 'files' not in new:
    return f'its files changed ({old.get("num_files")} files then, {new["num_files"]} now)'
  before = {f[0]: f[1:] for f in old['files']}
  after = {f[0]: f[1:] for f in new['files']}
  parts = []
  for what, names in (('added', sorted(set(after) - set(before))),
                      ('removed', sorted(set(before) - set(after))),
                      ('modified', sorted(n for n in set(before) & set(after)
                                          if before[n] != after[n]))):
    if names:
      parts.append(f'{len(names)} {what}: {_first(names, 3)}')
  return 'its files changed since it was built (' + '; '.join(parts) + ')'
