"""Prompt fidelity for the shapes dataset: read the object's colour and shape back from pixels."""

import re

import numpy as np

from ldm_jax.data import shapes as shapes_lib

_PALETTE = np.array(list(shapes_lib.COLOURS.values()), np.float32)
_NAMES = list(shapes_lib.COLOURS)


def nearest_colour(rgb):
  return _NAMES[int(np.argmin(np.sum((_PALETTE - np.asarray(rgb, np.float32)) ** 2, axis=-1)))]


def read_image(image):
  """(colour, shape) of the main object in an image of one shape on a plain background.

  The background is the median border colour; object pixels are those far from it. The colour
  is the palette colour nearest to the object's core; the shape comes from whether its top is
  narrower than its bottom (triangle) and how much of its bounding box it fills (square or
  circle).

  Args:
    image: (H, W, 3) uint8.

  Returns:
    (colour name, shape name), or (None, None) when no object stands out.
  """
  img = np.asarray(image, np.float32)
  border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
  background = np.median(border, axis=0)
  dist = np.sqrt(np.sum((img - background) ** 2, axis=-1))
  if dist.max() < 60:
    return None, None
  weight = np.clip(dist / dist.max(), 0, 1)  # soft object mask, 1 inside
  mask = weight > 0.5
  ys, xs = np.nonzero(mask)
  colour = nearest_colour(img[weight > 0.8].mean(axis=0))
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  box = weight[y0:y1, x0:x1]
  mid = box.shape[0] // 2
  top, bottom = box[:mid].sum(), box[box.shape[0] - mid:].sum()
  if bottom > 1.25 * top:  # a triangle's base is at the bottom (circles and squares: ~1)
    return colour, 'triangle'
  # How much of its bounding box the (thresholded) object fills: a square ~0.9-1, a circle
  # ~0.7-0.86 (pi / 4 when sharp), whatever the blur (calibrated with Gaussian blurs of the
  # dataset's own images up to radius 1.6 px at 32 px).
  fill = mask[y0:y1, x0:x1].mean()
  return colour, 'square' if fill > 0.875 else 'circle'


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


def evaluate_folder(folder):
  """Prompt fidelity of a sample.py output folder, on training and held-out combinations.

  Returns:
    {'train': fidelity dict, 'holdout': fidelity dict} (a group without prompts is left out).
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  groups = {'train': ([], []), 'holdout': ([], [])}
  with open(os.path.join(folder, 'samples.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      colour, shape = parse_prompt(record['prompt'])
      group = 'holdout' if shapes_lib.is_holdout(colour, shape) else 'train'
      groups[group][0].append(np.asarray(Image.open(os.path.join(folder, record['file']))))
      groups[group][1].append(record['prompt'])
  return {name: fidelity(images, prompts) for name, (images, prompts) in groups.items() if prompts}


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
