"""Sample files in and out: PNGs, a grid and samples.jsonl; init images and masks from disk."""

import json
import math
import os

import numpy as np
from PIL import Image
from PIL import ImageOps

SAMPLES_JSONL = 'samples.jsonl'
GRID_PNG = 'grid.png'
MAX_GRID_IMAGES = 64  # a grid of thousands of 512px images would be a gigapixel file


def image_name(index):
  """The file name of sample `index`: 000000.png, 000001.png, ..."""
  return f'{index:06d}.png'


def make_grid(images, cols=None):
  """Tiles same-sized images into one near-square grid, row-major, padding with black.

  Args:
    images: uint8 (N, H, W, C), N >= 1.
    cols: images per row; default ceil(sqrt(N)).

  Returns:
    uint8 (rows * H, cols * W, C).
  """
  images = np.asarray(images)
  if images.ndim != 4 or not len(images):
    raise ValueError(f'make_grid needs a non-empty (N, H, W, C) array, got shape {images.shape}')
  n, h, w, c = images.shape
  cols = min(cols or math.ceil(math.sqrt(n)), n)
  if cols < 1:
    raise ValueError(f'make_grid needs cols >= 1, got {cols}')
  rows = math.ceil(n / cols)
  padded = np.zeros((rows * cols, h, w, c), images.dtype)
  padded[:n] = images
  # (rows, cols, H, W, C) -> (rows, H, cols, W, C) puts each row's images side by side.
  grid = padded.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * h, cols * w, c)


def _to_pil(image):
  """An (H, W, 3) or (H, W, 1) uint8 array as a Pillow image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'samples must be uint8, got {image.dtype}')
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def write_samples(out_dir, images, records, start=0, grid=True):
  """Writes one PNG per image, their lines of samples.jsonl and (optionally) grid.png.

  `start > 0` continues a run written batch by batch: files are numbered from `start` and
  lines appended; `start == 0` begins samples.jsonl afresh.

  Args:
    out_dir: the folder (created if missing).
    images: uint8 (N, H, W, 3).
    records: N dicts of JSON-serialisable values (prompt, seed, ...); each line gets a `file`
      key first, naming its PNG relative to `out_dir`.
    start: the index of the first image.
    grid: also write grid.png of these images (at most MAX_GRID_IMAGES of them).

  Returns:
    The records as written, each with its `file`.
  """
  if len(images) != len(records):
    raise ValueError(f'{len(images)} images but {len(records)} records')
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for i, (image, record) in enumerate(zip(images, records)):
    written.append({'file': image_name(start + i), **record})
    _to_pil(image).save(os.path.join(out_dir, written[-1]['file']))
  with open(os.path.join(out_dir, SAMPLES_JSONL), 'a' if start else 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in written)
  if grid and len(images):
    write_grid(out_dir, images)
  return written


def write_grid(out_dir, images, cols=None):
  """Writes grid.png of the first MAX_GRID_IMAGES images; returns its path."""
  path = os.path.join(out_dir, GRID_PNG)
  os.makedirs(out_dir, exist_ok=True)
  _to_pil(make_grid(np.asarray(images)[:MAX_GRID_IMAGES], cols)).save(path)
  return path


def read_records(out_dir):
  """The records of samples.jsonl in `out_dir`, in order."""
  with open(os.path.join(out_dir, SAMPLES_JSONL), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _open(path, what):
  """Opens an image file with a message naming `path` when that fails."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} {path!r} does not exist (or is not a file)')
  try:
    image = Image.open(path)
    image.load()
  except (OSError, Image.UnidentifiedImageError) as e:
    raise ValueError(f'{what} {path!r} is not an image Pillow can read: {e}') from e
  return ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF


def pixel_size(path, what='image'):
  """The (width, height) of the image at `path`, as it is shown (EXIF rotation applied)."""
  return _open(path, what).size


def image_size(path, multiple, what='image'):
  """The (height, width) of the image at `path`, each rounded down to a multiple of `multiple`
  (the VAE's downsampling factor)."""
  width, height = _open(path, what).size
  if height < multiple or width < multiple:
    raise ValueError(f'{what} {path!r} is {width}x{height}; it needs at least '
                     f'{multiple}x{multiple} pixels')
  return height // multiple * multiple, width // multiple * multiple


def load_image(path, height, width):
  """Loads an init image: RGB, resized to (height, width).

  Args:
    path: an image file Pillow reads (PNG, JPEG, ...); alpha is dropped, greyscale expanded.
    height: output height in pixels.
    width: output width in pixels.

  Returns:
    float32 (height, width, 3) in [-1, 1].
  """
  image = _open(path, 'init image').convert('RGB')
  if image.size != (width, height):
    image = image.resize((width, height), Image.Resampling.LANCZOS)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def load_mask(path, height, width):
  """Loads an inpainting mask: greyscale, resized to (height, width), white = repaint.

  Args:
    path: an image file; colour images are converted to luminance, alpha is ignored.
    height: output height in pixels.
    width: output width in pixels.

  Returns:
    float32 (height, width, 1) in [0, 1]; 1 marks the pixels to repaint.
  """
  mask = _open(path, 'mask').convert('L')
  if mask.size != (width, height):
    # Bilinear rather than Lanczos: no ringing outside [0, 1] at the mask's edges.
    mask = mask.resize((width, height), Image.Resampling.BILINEAR)
  return (np.asarray(mask, np.float32) / 255.0)[..., None]
