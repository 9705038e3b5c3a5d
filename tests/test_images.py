"""images.decode_for and images.fit: their fast paths against a plain decode, resize and crop."""

import io

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from ldm_jax.data import images

# A reduced-scale JPEG decode against a full decode, both fitted to 64 px (bench/NOTES.md,
# "Issue 16: input throughput"): mean and largest difference in levels.
DRAFT_MEAN_TOL, DRAFT_MAX_TOL = 1.0, 32  # measured: 0.51, 20; a box off by half a decoded
# pixel: 2.1, 61


def _picture(w, h, seed=0):
  """A w x h RGB array: smooth gradients, a dark square off-centre (to see the crop's place)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
  a = np.stack([128 + 100 * np.sin(6 * xx + 3 * yy + rng.uniform(0, 6)) for _ in range(3)], -1)
  a[h // 5:h // 5 + h // 4, w // 3:w // 3 + w // 4] = 20
  return np.clip(a, 0, 255).astype(np.uint8)


def _encode(a, fmt, orientation=1):
  buf = io.BytesIO()
  exif = Image.Exif()
  if orientation != 1:
    exif[0x0112] = orientation
  Image.fromarray(a).save(buf, fmt, exif=exif.tobytes(), **({'quality': 95} if fmt == 'JPEG'
                                                             else {}))
  return buf.getvalue()


def _plain(value):
  """The full decode: EXIF applied, RGB."""
  img = Image.open(io.BytesIO(value))
  return ImageOps.exif_transpose(img).convert('RGB')


def _plain_fit(img, width, height, crop, rng):
  """The whole image resized (bilinear) to cover width x height, then cropped."""
  w, h = img.size
  if not ((w == width and h >= height) or (h == height and w >= width)):
    scale = max(width / w, height / h)
    img = img.resize((max(width, round(w * scale)), max(height, round(h * scale))),
                     Image.Resampling.BILINEAR)
  w, h = img.size
  if crop == 'random':
    left, top = int(rng.integers(0, w - width + 1)), int(rng.integers(0, h - height + 1))
  else:
    left, top = (w - width) // 2, (h - height) // 2
  return img.crop((left, top, left + width, top + height)), (top, left), (h, w)


def _fitted(value, width, height, crop='random', seed=0, plain=False):
  rng = np.random.default_rng(seed)
  if plain:
    img = _plain(value)
    out, offsets, size = _plain_fit(img, width, height, crop, rng)
    return np.asarray(out), offsets, size, img.size, rng
  img, original = images.decode_for(value, width, height)
  out, offsets, size = images.fit(img, width, height, crop, rng)
  return np.asarray(out), offsets, size, original, rng


@pytest.mark.parametrize('fmt,w,h', [('PNG', 32, 45), ('PNG', 50, 32), ('JPEG', 64, 80),
                                     ('JPEG', 64, 64)])
@pytest.mark.parametrize('crop', ['center', 'random'])
def test_no_resize_is_the_plain_crop_bit_for_bit(fmt, w, h, crop):
  """An image that covers the box with one side equal is only cropped: shapes' 32 px records."""
  value = _encode(_picture(w, h), fmt)
  width = height = min(w, h)
  got, want = _fitted(value, width, height, crop), _fitted(value, width, height, crop, plain=True)
  np.testing.assert_array_equal(got[0], want[0])
  assert got[1:4] == want[1:4]
  pixels = _picture(w, h)  # records that hold pixels, not files
  img, original = images.decode_for(pixels, width, height)
  out, offsets, _ = images.fit(img, width, height, crop, np.random.default_rng(0))
  top, left = offsets
  assert original == (w, h)
  np.testing.assert_array_equal(np.asarray(out), pixels[top:top + height, left:left + width])


@pytest.mark.parametrize('size,box', [((70, 50), (32, 32)), ((301, 90), (64, 48)),
                                      ((41, 200), (64, 64)), ((500, 300), (64, 64))])
def test_resized_png_is_the_plain_resize_and_crop(size, box):
  """Only the crop is resampled, in the whole image's pass order: the same region and pixels
  to Pillow's float32 rounding of the box (1 level, in a few pixels of 10,000)."""
  a = np.random.default_rng(1).integers(0, 256, size[::-1] + (3,), np.uint8)  # the worst case
  value = _encode(a, 'PNG')
  for crop, seed in (('center', 0), ('random', 1), ('random', 2)):
    got, want = _fitted(value, *box, crop, seed), _fitted(value, *box, crop, seed, plain=True)
    assert got[1:4] == want[1:4]
    diff = np.abs(got[0].astype(int) - want[0])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (crop, diff.max(), (diff > 0).mean())


@pytest.mark.parametrize('orientation', range(1, 9))
def test_reduced_scale_jpeg_against_the_full_decode(orientation):
  """A JPEG 4-6x the box decodes at 1/4 scale: the stored size EXIF-oriented, the same geometry
  as the full decode, the pixels within the stated tolerance (odd sizes: the decode's last
  column and row are partial, and EXIF flips move them to the other side)."""
  value = _encode(_picture(403, 301), 'JPEG', orientation)
  turned = orientation >= 5
  for crop, seed in (('center', 0), ('random', 3)):
    got, want = _fitted(value, 64, 48, crop, seed), _fitted(value, 64, 48, crop, seed, plain=True)
    assert got[3] == want[3] == ((301, 403) if turned else (403, 301))
    assert got[1:3] == want[1:3]
    assert got[4].random() == want[4].random()  # the same draws
    diff = np.abs(got[0].astype(int) - want[0])
    assert diff.mean() < DRAFT_MEAN_TOL and diff.max() <= DRAFT_MAX_TOL, (diff.mean(), diff.max())
  img, _ = images.decode_for(value, 64, 48)
  assert img.size == ((76, 101) if turned else (101, 76))  # ceil(403 / 4), ceil(301 / 4)


def test_jpeg_is_decoded_no_smaller_than_it_is_resized_to():
  """The DCT scale stops where the decode still covers the resized size (here 1/2: 1/4 of 250
  px would be 63 < 64), and a JPEG smaller than twice the box decodes at full scale."""
  for (w, h), decoded in (((250, 260), (125, 130)), ((127, 600), (127, 600)),
                          ((600, 127), (600, 127))):
    img, original = images.decode_for(_encode(_picture(w, h), 'JPEG'), 64, 64)
    assert (img.size, original) == (decoded, (w, h))


def test_crop_offsets_and_rng_order():
  """Random crops draw left, then top, from the record's generator; center crops draw nothing.
  The offsets are where the crop lies in the resized image."""
  img = Image.fromarray(_picture(120, 80))
  rng = np.random.default_rng(7)
  out, (top, left), (h, w) = images.fit(img, 40, 40, 'random', rng)
  assert (h, w) == (40, 60)
  expect = np.random.default_rng(7)
  assert (left, top) == (int(expect.integers(0, 21)), int(expect.integers(0, 1)))
  assert rng.random() == expect.random()
  resized = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))
  assert np.abs(np.asarray(out).astype(int) - resized[top:top + 40, left:left + 40]).max() <= 1
  state = rng.bit_generator.state
  _, offsets, _ = images.fit(img, 40, 30, 'center', rng)
  assert offsets == (0, 2) and rng.bit_generator.state == state  # resized to 45 x 30


def test_fit_of_a_changed_image_ignores_the_decode_note():
  """An image transformed after decode_for (its size no longer the decode's) is fitted as the
  image it is."""
  img, _ = images.decode_for(_encode(_picture(400, 300), 'JPEG'), 64, 64)
  smaller = img.crop((0, 0, 80, 70))
  _, offsets, size = images.fit(smaller, 64, 64, 'center', None)
  assert size == (64, 73) and offsets == (0, 4)
