"""A folder of the user's images with captions, in the usual conventions.

Captions come from `metadata.jsonl` or `metadata.csv` (columns `file_name` and `text`, as
Hugging Face's imagefolder reads them) or from a sidecar `name.txt` beside each `name.jpg`.
Images are kept as their file bytes and decoded by the loader, which skips and counts the ones
that do not decode.
"""

import csv
import dataclasses
import json
import logging
import os

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')


@dataclasses.dataclass
class ScanStats:
  """What a scan found and what it had to leave out."""
  images: int = 0
  no_caption: list = dataclasses.field(default_factory=list)
  empty_caption: list = dataclasses.field(default_factory=list)
  not_utf8: list = dataclasses.field(default_factory=list)
  missing_file: list = dataclasses.field(default_factory=list)

  def summary(self):
    parts = [f'{self.images} images with captions']
    for name in ('no_caption', 'empty_caption', 'not_utf8', 'missing_file'):
      items = getattr(self, name)
      if items:
        parts.append(f'{len(items)} skipped ({name.replace("_", " ")}: {", ".join(items[:5])}'
                     f'{", ..." if len(items) > 5 else ""})')
    return '; '.join(parts)


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
    with open(os.path.join(src, 'metadata.csv'), newline='', encoding='utf-8') as f:
      rows = [(r['file_name'], r.get('text')) for r in csv.DictReader(f)]
  else:
    rows = list(_sidecar_rows(src, stats))
  pairs = []
  for name, text in rows:
    if not os.path.isfile(os.path.join(src, name)):
      stats.missing_file.append(name)
    elif text is None:
      stats.no_caption.append(name)
    elif not text.strip() and not keep_empty_captions:
      stats.empty_caption.append(name)
    else:
      pairs.append((name, text.strip()))
  stats.images = len(pairs)
  if not pairs:
    raise ValueError(f'no captioned images in {src!r}: give metadata.jsonl / metadata.csv with '
                     f'file_name and text, or a name.txt beside each image ({stats.summary()})')
  logging.info('folder %s: %s', src, stats.summary())
  return pairs, stats


def _jsonl_rows(path):
  rows = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows.append((row['file_name'], row.get('text')))
  return rows


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
