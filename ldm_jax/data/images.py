"""Image files to 8-bit RGB, for every mode Pillow opens them in (16-bit and float included).

Pillow's `convert('RGB')` clips 16-bit and 32-bit greys to 255 instead of scaling them, so
those modes are scaled here first:
  I;16, I;16B, I;16L, I;16N and I: 16-bit levels (0..65535), value / 257 (65535 -> 255). 'I'
    is 32-bit, but files hold it as 16-bit greys (TIFF, older Pillow's 16-bit PNG); values
    outside 0..65535 are clipped.
  F (float TIFF): [0, 1] when every value is in it (the float convention), else 0..255 (Pillow's
    own, `convert('F')` of an 8-bit image) when every value is in that, else the image's own
    min..max range is stretched to 0..255 (HDR or 16-bit data stored as floats).
Transparent images (RGBA, LA, PA, P or L/RGB with a transparent colour) are composited on
white. 16-bit RGB(A) PNGs come out of Pillow's decoder as 8-bit already.

Training decodes with `decode_for` and `fit`: large JPEGs decode at a reduced DCT scale and only
the crop is resampled (bench/NOTES.md, "Issue 16: input throughput").
"""

import io
import math
import re

import numpy as np
from PIL import Image
from PIL import ImageOps
from PIL import JpegImagePlugin

SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
# What a decode can raise for a file that is not a usable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_ORIENTATION = 0x0112  # the EXIF tag
_T = Image.Transpose
# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose),
# and where that sends a point (x, y) of a w x h image (continuous coordinates).
_UPRIGHT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
            6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_MOVE = {_T.FLIP_LEFT_RIGHT: lambda x, y, w, h: (w - x, y),
         _T.ROTATE_180: lambda x, y, w, h: (w - x, h - y),
         _T.FLIP_TOP_BOTTOM: lambda x, y, w, h: (x, h - y),
         _T.TRANSPOSE: lambda x, y, w, h: (y, x),
         _T.ROTATE_270: lambda x, y, w, h: (h - y, x),
         _T.TRANSVERSE: lambda x, y, w, h: (h - y, w - x),
         _T.ROTATE_90: lambda x, y, w, h: (y, w - x)}
_TURNS = (_T.TRANSPOSE, _T.ROTATE_270, _T.TRANSVERSE, _T.ROTATE_90)  # width and height swap
# decode_for's note to fit on a reduced-scale decode: (the decoded size, EXIF applied; the stored
# size, EXIF applied; the stored image's box in the decoded one: its last row and column may be
# partly past the stored image's edge).
_DRAFTED = 'ldm_jax.drafted'


def decode(value):
  """An image record value (encoded bytes or an HWC uint8 array) as an RGB PIL image.

  Raises:
    One of DECODE_ERRORS: the bytes are not a complete image Pillow can read.
  """
  if _is_pixels(value):
    return Image.fromarray(value)
  img = Image.open(io.BytesIO(bytes(value)))
  img.load()  # decode now: a truncated file raises here, not later
  ImageOps.exif_transpose(img, in_place=True)
  return to_rgb(img)


def decode_for(value, width, height):
  """An image record value decoded for a width x height training crop.

  A JPEG at least twice the size it will be resized to (see `fit`) decodes at the smallest DCT
  scale (1/2, 1/4 or 1/8) that still covers that size: less inverse-DCT and colour work (the
  entropy decoding stays) and 4-64x fewer pixels for `fit` to resample. `fit` keeps the full
  decode's geometry; the pixels differ from it by about 1 level on average, 35 at most on noisy
  photos (bench/NOTES.md, "Issue 16: input throughput").

  Returns:
    (the RGB PIL image, (width, height) of the image as stored, EXIF orientation applied).

  Raises:
    One of DECODE_ERRORS.
  """
  if _is_pixels(value):
    img = Image.fromarray(value)
    return img, img.size
  img = Image.open(io.BytesIO(bytes(value)))
  stored, method, box = img.size, None, None
  if isinstance(img, JpegImagePlugin.JpegImageFile):  # MPO (phone photos) included
    method = _UPRIGHT.get(img.getexif().get(_ORIENTATION, 1))  # what exif_transpose will do
    if method in _TURNS:
      width, height = height, width  # the draft sees the image as stored
    box = _draft(img, _cover(stored, width, height))
  img.load()  # decode now: a truncated file raises here, not later
  drafted = img.size
  ImageOps.exif_transpose(img, in_place=True)
  img = to_rgb(img)
  if box is None:
    return img, img.size
  if method is not None:
    box = _transpose_box(box, drafted, method)
    stored = stored[::-1] if method in _TURNS else stored
  img.info[_DRAFTED] = (img.size, stored, box)
  return img, stored


def fit(img, width, height, crop, rng):
  """Resizes `img` to cover width x height (its aspect kept, bilinear) and crops that box.

  Only the crop is resampled, its pixels those of the whole image resized, then cropped (to 1
  level in a few pixels: `_resample`); an image that covers the box with one side equal is only
  cropped. A JPEG that `decode_for` decoded at reduced scale is fitted as its stored size would
  be: the same resized size and crop offsets, resampled from the smaller decode.

  Args:
    img: a PIL image.
    width, height: the output size (a square `resolution` or an aspect-ratio bucket).
    crop: 'center', or 'random' (offsets drawn from `rng`, a numpy Generator).
    rng: the record's generator (used only by random crops).

  Returns:
    (the cropped image, (top, left): the crop's offsets in the resized image, as SDXL's
    `crops_coords_top_left` counts them, (height, width) of the resized image).
  """
  decoded, (w, h), box = img.info.get(_DRAFTED, (None, img.size, None))
  if decoded != img.size:  # not as decode_for left it: fit what it is
    (w, h), box = img.size, None
  rw, rh = _cover((w, h), width, height)
  if crop == 'random':
    left, top = int(rng.integers(0, rw - width + 1)), int(rng.integers(0, rh - height + 1))
  else:
    left, top = (rw - width) // 2, (rh - height) // 2
  x0, y0, x1, y1 = box or (0, 0, w, h)
  sx, sy = (x1 - x0) / rw, (y1 - y0) / rh  # source pixels per resized pixel
  src = (x0 + left * sx, y0 + top * sy, x0 + (left + width) * sx, y0 + (top + height) * sy)
  if (sx, sy) == (1, 1) and all(v == int(v) for v in src):  # no resampling needed
    return img.crop(tuple(int(v) for v in src)), (top, left), (rh, rw)
  # Pillow 13 resamples the height first when it shrinks by more than twice the width's pixels;
  # decided on the whole image's sizes, as a resize of all of it would.
  shrink_x, shrink_y = img.width - rw * img.width / w, img.height - rh * img.height / h
  vertical_first = shrink_y > 0 and shrink_y > 2 * shrink_x
  return _resample(img, (width, height), src, vertical_first), (top, left), (rh, rw)


def check(path):
  """Decodes the image file at `path` as training will; returns its (width, height).

  JPEGs decode at reduced scale (their whole bitstream is still read, so a truncated file
  fails as it does at full scale).

  Raises:
    One of DECODE_ERRORS.
  """
  with Image.open(path) as img:
    size = img.size
    img.draft('RGB', (max(1, size[0] // 8), max(1, size[1] // 8)))  # a no-op but for JPEG
    img.load()
    to_rgb(img)
  return size


def describe(error, path=None):
  """Pillow's message for a decode error, without the file object or path it repeats."""
  text = re.sub(r'<_io\.BytesIO object at 0x[0-9a-f]+>', '', str(error))
  if path:
    text = text.replace(repr(str(path)), '').replace(str(path), '')
  return text.strip().rstrip(' :') or type(error).__name__


def to_rgb(img):
  """`img` (any mode) as an 8-bit RGB image; see the module docstring for the rules."""
  if img.mode in SIXTEEN_BIT_MODES or img.mode == 'F':
    img = Image.fromarray(_grey_to_8bit(img.mode, np.asarray(img)), 'L')
  if (img.mode in ('RGBA', 'LA', 'PA')
      or (img.mode in ('P', 'L', 'RGB') and 'transparency' in img.info)):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return img if img.mode == 'RGB' else img.convert('RGB')  # 1, L, P, CMYK, YCbCr, LAB


def _is_pixels(value):
  return isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3


def _cover(size, width, height):
  """The size `fit` resizes a `size` (w, h) image to: covering width x height, aspect kept."""
  w, h = size
  if (w == width and h >= height) or (h == height and w >= width):  # it covers exactly
    return w, h
  scale = max(width / w, height / h)
  return max(width, round(w * scale)), max(height, round(h * scale))


def _resample(img, size, box, vertical_first):
  """Bilinear resize of `box` (floats) of `img` to `size`, as two one-axis passes in the given
  order, each over only the rows or columns the box needs: the pixels of a resize of the whole
  image, cropped, but for Pillow's float32 rounding of the box (1 level, in 0.06% of the pixels
  on average, 1.6% at worst, of 200 random images and crops). A single `resize(box=...)` would
  pick its pass order from the box's sizes, not the whole image's (1 level in up to 26%)."""
  (w, h), (x0, y0, x1, y1) = size, box
  bilinear = Image.Resampling.BILINEAR
  if vertical_first:
    a, b = _span(x0, x1, w, img.width)
    strip = img if (a, b) == (0, img.width) else img.crop((a, 0, b, img.height))
    strip = strip.resize((b - a, h), bilinear, box=(0, y0, b - a, y1))
    return strip.resize((w, h), bilinear, box=(x0 - a, 0, x1 - a, h))
  a, b = _span(y0, y1, h, img.height)
  strip = img if (a, b) == (0, img.height) else img.crop((0, a, img.width, b))
  strip = strip.resize((w, b - a), bilinear, box=(x0, 0, x1, b - a))
  return strip.resize((w, h), bilinear, box=(0, y0 - a, w, y1 - a))


def _span(lo, hi, out, size):
  """The pixels [a, b) of a `size` axis that a bilinear resample of [lo, hi) to `out` reads
  (and a pixel more each side: Pillow rounds the filter's ends)."""
  support = max(1.0, (hi - lo) / out)  # the bilinear filter's, widened when shrinking
  return max(0, int(lo - support) - 1), min(size, math.ceil(hi + support) + 1)


def _draft(img, size):
  """Has an opened JPEG decode at the smallest DCT scale whose result still covers `size` (the
  size it will be resized to); the stored image's box in the decoded one, or None (full scale)."""
  if min(img.size[0] // size[0], img.size[1] // size[1]) < 2:
    return None
  drafted = img.draft('RGB', size)  # the mode stays (an L or CMYK JPEG stays L or CMYK)
  return drafted[1] if drafted else None


def _transpose_box(box, size, method):
  """Where `method` (a Transpose) sends `box` of a `size` image."""
  (ax, ay), (bx, by) = (_MOVE[method](x, y, *size) for x, y in (box[:2], box[2:]))
  return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _grey_to_8bit(mode, a):
  """16-bit, 32-bit int or float greys as uint8 levels (rules in the module docstring)."""
  a = a.astype(np.float64)
  if mode != 'F':
    a = np.clip(a, 0, 65535) / 257
  else:
    a = np.nan_to_num(a)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
      a = a * 255
    elif lo < 0 or hi > 255:
      a = (a - lo) * (255 / max(hi - lo, 1e-12))
  return np.clip(np.round(a), 0, 255).astype(np.uint8)
