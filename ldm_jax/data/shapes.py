"""The synthetic `shapes` dataset: coloured circles, squares and triangles with captions.

Deterministic (each example is drawn from its own seed), offline, and fast to build. The
`holdout` split holds colour/shape combinations that `train` never shows, so that generalisation
to new prompts can be measured (`ldm_jax.evaluation.shapes` reads colour and shape back).
"""

import dataclasses

import numpy as np
from PIL import Image
from PIL import ImageDraw

COLOURS = {
    'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 70, 220),
    'yellow': (240, 215, 40), 'purple': (140, 50, 180), 'orange': (245, 135, 25),
    'white': (245, 245, 245), 'black': (25, 25, 25),
}
SHAPES = ('circle', 'square', 'triangle')
# Never in `train` (as any object of an image); the only combinations in `holdout`. Each colour
# and each shape still appears in train with other partners.
HOLDOUT = (('red', 'triangle'), ('blue', 'circle'), ('green', 'square'), ('yellow', 'triangle'))
POSITIONS = {  # name -> (x, y) centre as a fraction of the image, and the caption phrase
    'top left': ((0.3, 0.3), 'in the top left corner'), 'top': ((0.5, 0.3), 'at the top'),
    'top right': ((0.7, 0.3), 'in the top right corner'), 'left': ((0.3, 0.5), 'on the left'),
    'center': ((0.5, 0.5), 'in the center'), 'right': ((0.7, 0.5), 'on the right'),
    'bottom left': ((0.3, 0.7), 'in the bottom left corner'), 'bottom': ((0.5, 0.7), 'at the bottom'),
    'bottom right': ((0.7, 0.7), 'in the bottom right corner'),
}
SIZES = {'small': 0.18, 'large': 0.26}  # radius as a fraction of the image side
# The centered layout's objects are larger: nothing else shares the image, and at 32 px a small
# square's corners (or a triangle's) are then still visible after a VAE's blur.
CENTERED_SIZES = {'small': 0.24, 'large': 0.34}
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth, antialiased edges


@dataclasses.dataclass(frozen=True)
class Shape:
  colour: str
  shape: str
  size: str
  position: str


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray  # (S, S, 3) uint8
  caption: str
  background: str
  shapes: tuple  # of Shape


def render(objects, background, image_size, sizes=None):
  """Draws `objects` (Shapes) on a `background` colour; returns (S, S, 3) uint8.

  `sizes` maps size names to radii as fractions of the side (SIZES by default).
  """
  sizes = SIZES if sizes is None else sizes
  big = image_size * _SUPERSAMPLE
  img = Image.new('RGB', (big, big), COLOURS[background])
  draw = ImageDraw.Draw(img)
  for obj in objects:
    (fx, fy), _ = POSITIONS[obj.position]
    cx, cy, r = fx * big, fy * big, sizes[obj.size] * big
    colour = COLOURS[obj.colour]
    if obj.shape == 'circle':
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif obj.shape == 'square':
      s = r  # the circle's bounding box: at 32 px its corners are what tells it from a circle
      draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:  # an upright equilateral-ish triangle inscribed in the circle
      draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)],
                   fill=colour)
  return np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX))


def caption(objects, background, rng):
  """A caption from one of several templates; colour and shape words always appear."""
  if len(objects) == 2:
    a, b = objects
    templates = ['a {0} {1} and a {2} {3}', '{0} {1} and {2} {3} on a {4} background',
                 'a {0} {1} next to a {2} {3}']
    return rng.choice(templates).format(a.colour, a.shape, b.colour, b.shape, background)
  (o,) = objects
  phrase = POSITIONS[o.position][1]
  templates = [
      'a {c} {s}', 'a {c} {s} on a {b} background', 'a {z} {c} {s}', 'a {z} {c} {s} {p}',
      '{c} {s}', 'a picture of a {c} {s}', 'a {c} {s} {p}', 'a {z} {c} {s} on {b}',
  ]
  return rng.choice(templates).format(c=o.colour, s=o.shape, z=o.size, p=phrase, b=background)


def caption_words():
  """Every word a shapes caption can use (for a word-level tokenizer)."""
  words = set(COLOURS) | set(SHAPES) | set(SIZES)
  words |= {'a', 'on', 'background', 'picture', 'of', 'and', 'next', 'to'}
  for _, phrase in POSITIONS.values():
    words |= set(phrase.split())
  return sorted(words)


def is_holdout(colour, shape):
  return (colour, shape) in HOLDOUT


LAYOUTS = ('scattered', 'centered')


def make_example(split, index, image_size=32, seed=0, two_shape_prob=0.15, layout='scattered'):
  """Example `index` of `split` ('train' or 'holdout'), drawn from its own seed.

  `layout` 'scattered': one object (sometimes two, left and right, in train) at one of nine
  positions; 'centered': one larger object (CENTERED_SIZES) at the center, the CPU demo's:
  colour and shape are then all there is to learn.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'unknown shapes layout {layout!r}; choose one of {LAYOUTS}')
  rng = np.random.default_rng([seed, {'train': 0, 'holdout': 1}[split], index])
  colours, n = list(COLOURS), 2 if split == 'train' and rng.random() < two_shape_prob else 1
  if layout == 'centered':
    n = 1
  while True:
    objects = []
    for k in range(n):
      used = {o.colour for o in objects}
      colour = str(rng.choice([c for c in colours if c not in used]))
      shape = str(rng.choice(SHAPES))
      size = 'small' if n == 2 else str(rng.choice(list(SIZES)))
      position = (('left', 'right')[k] if n == 2 else str(rng.choice(list(POSITIONS))))
      if layout == 'centered':
        position = 'center'
      objects.append(Shape(colour, shape, size, position))
    holdout = [is_holdout(o.colour, o.shape) for o in objects]
    if (split == 'holdout' and all(holdout)) or (split == 'train' and not any(holdout)):
      break
  background = str(rng.choice([c for c in colours if c not in {o.colour for o in objects}]))
  sizes = CENTERED_SIZES if layout == 'centered' else SIZES
  return Example(render(objects, background, image_size, sizes), caption(objects, background, rng),
                 background, tuple(objects))
