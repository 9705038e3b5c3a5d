"""The shapes prompt-fidelity reader: right on the dataset's images, soft or not, and not lenient."""

import numpy as np
import pytest
from scipy import ndimage

from ldm_jax.data import shapes
from ldm_jax.evaluation import shapes as shapes_eval


def _singles(layout, count=60):
  examples = (shapes.make_example('train', i, 32, seed=5, layout=layout) for i in range(count))
  return [e for e in examples if len(e.shapes) == 1]


def _superellipse(p, fg=(240, 215, 40), bg=(40, 70, 220), size=32, radius=10, supersample=8):
  """|x|^p + |y|^p <= radius^p, antialiased: a disc at p=2, a square as p grows."""
  n = size * supersample
  y, x = (np.mgrid[:n, :n] + 0.5) / supersample - size / 2
  inside = np.abs(x / radius) ** p + np.abs(y / radius) ** p <= 1
  cover = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
  return np.round(np.array(bg) + cover * (np.array(fg) - np.array(bg))).astype(np.uint8)


@pytest.mark.parametrize('layout,blurs', [('centered', (0, 1.0, 1.5)), ('scattered', (0, 1.0))])
def test_reads_the_datasets_images_sharp_or_blurred(layout, blurs):
  examples = _singles(layout)
  assert len(examples) >= 45 and {e.shapes[0].shape for e in examples} == set(shapes.SHAPES)
  for sigma in blurs:  # a VAE's or a sampler's soft edges: the moments do not change
    for e in examples:
      image = ndimage.gaussian_filter(e.image.astype(np.float32), (sigma, sigma, 0), mode='nearest')
      got = shapes_eval.read_image(np.round(image).astype(np.uint8))
      assert got == (e.shapes[0].colour, e.shapes[0].shape), (sigma, e.caption)


def test_specks_and_low_contrast_do_not_change_the_reading():
  examples = (shapes.make_example('holdout', i, 32, layout='centered') for i in range(500))
  example = next(e for e in examples if e.background == 'orange'
                 and (e.shapes[0].colour, e.shapes[0].shape) == ('yellow', 'triangle'))
  image = example.image.copy()  # yellow on orange: a colour distance of 81
  image[0, 0] = image[31, 31] = image[0, 30] = shapes.COLOURS['white']  # a decoder's stray pixels
  assert shapes_eval.read_image(image) == ('yellow', 'triangle')


def test_disc_to_square_border_is_in_between():
  reads = [shapes_eval.read_image(_superellipse(p))[1] for p in (2, 2.5, 3, 5, 8, 100)]
  assert reads == ['circle'] * 3 + ['square'] * 3  # a squircle (p=4) sits at the border


def test_no_object_reads_nothing():
  plain = np.full((32, 32, 3), 128, np.uint8)
  assert shapes_eval.read_image(plain) == (None, None)
  speck = plain.copy()
  speck[10, 12] = 255  # one pixel is not an object
  assert shapes_eval.read_image(speck) == (None, None)


def test_fidelity_counts_what_the_pixels_show():
  examples = _singles('centered')
  images = [e.image for e in examples]
  right = [f'a {e.shapes[0].colour} {e.shapes[0].shape}' for e in examples]
  swap = dict(zip(shapes.SHAPES, shapes.SHAPES[1:] + shapes.SHAPES[:1]))
  wrong = [f'a {e.shapes[0].colour} {swap[e.shapes[0].shape]}' for e in examples]
  assert shapes_eval.fidelity(images, right) == {'colour': 1.0, 'shape': 1.0, 'both': 1.0,
                                                 'n': len(examples)}
  assert shapes_eval.fidelity(images, wrong)['shape'] == 0.0
