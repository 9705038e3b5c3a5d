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
"""

import io
import re

import numpy as np
from PIL import Image
from PIL import ImageOps

SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
# What a decode can raise for a file that is not a usable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode(value):
  """An image record value (encoded bytes or an HWC uint8 array) as an RGB PIL image.

  Raises:
    One of DECODE_ERRORS: the bytes are not a complete image Pillow can read.
  """
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    return Image.fromarray(value)
  img = Image.open(io.BytesIO(bytes(value)))
  img.load()  # decode now: a truncated file raises here, not later
  return to_rgb(ImageOps.exif_transpose(img))


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
  return img.convert('RGB')  # 1, L, P, CMYK, YCbCr, LAB, RGB


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
