"""Prompt fidelity for the shapes dataset: read the object's colour and shape back from pixels.

The shape is read from two harmonic moments of the object's coverage, |sum t (x + iy)^3| and
|sum t (x + iy)^4| about its centroid (t: how much of each pixel the object covers). A disc has
neither, the dataset's triangle has a large third-order one and a square a fourth-order one.
(x + iy)^n is a harmonic polynomial, so these moments are unchanged by any isotropic blur (the
mean-value property), and normalised by the area they are unchanged by size: a soft-edged
generated or reconstructed shape reads as what it looks like, where thresholds on its outline
(how much of its bounding box it fills) did not. The reader never sees the prompt.
"""

import functools
import re

import numpy as np
from scipy import ndimage

from ldm_jax.data import shapes as shapes_lib

_PALETTE = np.array(list(shapes_lib.COLOURS.values()), np.float32)
_NAMES = list(shapes_lib.COLOURS)
_MIN_CONTRAST = 60  # RGB distance below which nothing stands out from the background
_MIN_AREA = 4  # pixels of coverage: less is a speck, not an object


def nearest_colour(rgb):
  return _NAMES[int(np.argmin(np.sum((_PALETTE - np.asarray(rgb, np.float32)) ** 2, axis=-1)))]


def _largest_region(mask):
  labels, n = ndimage.label(mask)
  if n == 0:
    return mask
  return labels == 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))


def _object(img):
  """(colour, coverage) of the main object of a float (H, W, 3) image, or None.

  The background is the median border colour. The object is the largest connected region that
  stands out from it (specks elsewhere, such as a decoder's stray corner pixels, are left out,
  however bright); its colour is its core's mean. The coverage of each pixel is its colour's
  position between background and object colour, in [0, 1], kept within 2 pixels of the
  object's half-covered region (its soft rim).
  """
  border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
  background = np.median(border, axis=0)
  dist = np.sqrt(np.sum((img - background) ** 2, axis=-1))
  if dist.max() < _MIN_CONTRAST:
    return None
  region = _largest_region(dist > _MIN_CONTRAST / 2)
  colour = img[region & (dist >= 0.8 * dist[region].max())].mean(axis=0)
  axis = colour - background
  coverage = np.clip((img - background) @ axis / (axis @ axis), 0, 1)
  return colour, coverage * ndimage.binary_dilation(_largest_region(coverage > 0.5), iterations=2)


def harmonic_moments(coverage):
  """(m3, m4): |sum t z^3| / A^2.5 and |sum t z^4| / A^3, z = x + iy about the centroid.

  Blur-, size- and position-invariant (m3, m4 also rotation-invariant); a disc gives (0, 0).
  """
  area = coverage.sum()
  ys, xs = np.mgrid[:coverage.shape[0], :coverage.shape[1]].astype(np.float64)
  z = xs - (coverage * xs).sum() / area - 1j * (ys - (coverage * ys).sum() / area)
  return (abs((coverage * z ** 3).sum()) / area ** 2.5,
          abs((coverage * z ** 4).sum()) / area ** 3)


@functools.lru_cache(maxsize=None)
def prototypes():
  """Each shape's harmonic moments, measured on the dataset's own drawing of it (128 px)."""
  out = {}
  for shape in shapes_lib.SHAPES:
    obj = shapes_lib.Shape('white', shape, 'large', 'center')
    img = shapes_lib.render([obj], 'black', 128, shapes_lib.CENTERED_SIZES).astype(np.float32)
    out[shape] = harmonic_moments(_object(img)[1])
  return out


def read_image(image):
  """(colour, shape) of the main object in an image of one shape on a plain background.

  The colour is the palette colour nearest to the object's core; the shape is the one whose
  harmonic moments (`prototypes`), each scaled by the shape that has it (the triangle's m3,
  the square's m4), are nearest: between a disc and a square the border is at half a square's
  m4, whatever the blur.

  Args:
    image: (H, W, 3) uint8.

  Returns:
    (colour name, shape name), or (None, None) when no object stands out.
  """
  found = _object(np.asarray(image, np.float32))
  if found is None or found[1].sum() < _MIN_AREA:
    return None, None
  colour, coverage = found
  protos = prototypes()
  scale = np.array([protos['triangle'][0], protos['square'][1]])
  point = np.array(harmonic_moments(coverage)) / scale
  shape = min(protos, key=lambda s: np.sum((point - np.array(protos[s]) / scale) ** 2))
  return nearest_colour(colour), shape


def parse_prompt(prompt):
  """(colour, shape) named first in a shapes caption, or (None, None)."""
  words = re.findall(r'[a-z]+', prompt.lower())
  colour = next((w for w in words if w in shapes_lib.COLOURS), None)
  shape = next((w for w in words if w in shapes_lib.SHAPES), None)
  return colour, shape


def fidelity(images, prompts):
  """Fraction of images whose read-back colour and shape match their prompt's.

  Returns:
    dict with 'colour', 'shape' and 'both' accuracies, and 'n'.
  """
  hits = np.zeros((len(prompts), 2), bool)
  for k, (image, prompt) in enumerate(zip(images, prompts)):
    want, got = parse_prompt(prompt), read_image(image)
    hits[k] = (want[0] == got[0], want[1] == got[1])
  return {'colour': float(hits[:, 0].mean()), 'shape': float(hits[:, 1].mean()),
          'both': float(hits.all(axis=1).mean()), 'n': len(prompts)}


def fidelity_by_group(images, prompts):
  """Prompt fidelity on training and on held-out colour/shape combinations.

  Returns:
    {'train': fidelity dict, 'holdout': fidelity dict} (a group without prompts is left out).
  """
  groups = {'train': ([], []), 'holdout': ([], [])}
  for image, prompt in zip(images, prompts):
    group = 'holdout' if shapes_lib.is_holdout(*parse_prompt(prompt)) else 'train'
    groups[group][0].append(image)
    groups[group][1].append(prompt)
  return {name: fidelity(*group) for name, group in groups.items() if group[1]}


def evaluate_folder(folder):
  """Prompt fidelity of a sample.py output folder (`fidelity_by_group`)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(os.path.join(folder, 'samples.jsonl')) as f:
    records = [json.loads(line) for line in f]
  images = [np.asarray(Image.open(os.path.join(folder, r['file']))) for r in records]
  return fidelity_by_group(images, [r['prompt'] for r in records])


def demo_prompts(per_combination=1):
  """One prompt per colour/shape combination (the held-out ones included), `a {colour} {shape}`."""
  return [f'a {c} {s}' for c in shapes_lib.COLOURS for s in shapes_lib.SHAPES] * per_combination


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description='Prompt fidelity of shapes samples.')
  parser.add_argument('--samples', help='a sample.py output folder (samples.jsonl + PNGs)')
  parser.add_argument('--write_prompts', help='write the demo prompts to this file and exit')
  parser.add_argument('--per_combination', type=int, default=1)
  args = parser.parse_args(argv)
  if args.write_prompts:
    with open(args.write_prompts, 'w') as f:
      f.write('\n'.join(demo_prompts(args.per_combination)) + '\n')
    return
  for group, score in evaluate_folder(args.samples).items():
    print(f'prompt fidelity, {group} combinations: {100 * score["both"]:.1f}% '
          f'(colour {100 * score["colour"]:.1f}%, shape {100 * score["shape"]:.1f}%, '
          f'{score["n"]} images)')


if __name__ == '__main__':
  main()
