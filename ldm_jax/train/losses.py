"""Training losses as pure float32 functions on arrays: CLIP contrastive, autoencoder, diffusion."""

import math

import jax
import jax.numpy as jnp

from ldm_jax.diffusion import schedules

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
CLIP_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the logit scale at 100
DECODER_LAST_LAYER = 'decoder/conv_out/kernel'  # the VAE's last layer, for the adaptive GAN weight


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _per_example(x, reduce):
  """`reduce` over every axis but the first (the batch)."""
  return reduce(x, axis=tuple(range(1, x.ndim)))


def l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) along the last axis in float32 (PyTorch `F.normalize`), NaN-free at 0."""
  x = _f32(x)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps * eps))


# ----------------------------------------------------------------------------- CLIP contrastive


def clip_contrastive(image_embeds, text_embeds, logit_scale):
  """CLIP's symmetric InfoNCE loss over a batch of matching (image, text) pairs.

  Both embeddings are L2-normalised; logits = exp(min(logit_scale, log 100)) * img @ txt.T, and
  the loss is the mean of the image->text (rows) and text->image (columns) cross-entropies with
  the targets on the diagonal. The batch is the global one (under `jax.jit` with a sharded batch
  the matrix spans every device's examples: all of them are negatives). The `jnp.minimum` clip
  gives no gradient once the scale passes log(100); CLIP also clamps the parameter itself after
  each update, which the trainer may do too (`jnp.minimum(p, CLIP_MAX_LOGIT_SCALE)`).

  Args:
    image_embeds: (B, D) image tower outputs (any dtype).
    text_embeds: (B, D) text tower outputs (`TextEncoderOutput.text_embeds`).
    logit_scale: scalar learned log inverse temperature (CLIP initialises it at
      `CLIP_INIT_LOGIT_SCALE` = log(1/0.07)).

  Returns:
    (loss, metrics): float32 scalar loss and a dict of float32 scalars: loss, loss_i2t, loss_t2i,
    accuracy_i2t and accuracy_t2i (top-1 retrieval within the batch), accuracy (their mean),
    temperature (1 / the clipped scale) and scale.
  """
  if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
    raise ValueError(f'image_embeds {image_embeds.shape} and text_embeds {text_embeds.shape} '
                     'must both be (B, D)')
  img, txt = l2_normalize(image_embeds), l2_normalize(text_embeds)
  scale = jnp.exp(jnp.minimum(_f32(logit_scale), CLIP_MAX_LOGIT_SCALE))
  logits = scale * jnp.einsum('id,td->it', img, txt, preferred_element_type=jnp.float32)
  labels = jnp.arange(logits.shape[0])
  loss_i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  loss_t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  loss = 0.5 * (loss_i2t + loss_t2i)
  acc_i2t = jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))
  acc_t2i = jnp.mean((jnp.argmax(logits, axis=0) == labels).astype(jnp.float32))
  metrics = dict(loss=loss, loss_i2t=loss_i2t, loss_t2i=loss_t2i, accuracy_i2t=acc_i2t,
                 accuracy_t2i=acc_t2i, accuracy=0.5 * (acc_i2t + acc_t2i),
                 temperature=1.0 / scale, scale=scale)
  return loss, metrics


# ----------------------------------------------------------------------------- autoencoder


def reconstruction(x, y, kind='l1', reduction='mean'):
  """Pixel reconstruction loss |x - y| ('l1') or (x - y)^2 ('l2') in float32.

  Args:
    x: (B, ...) targets.
    y: (B, ...) reconstructions.
    kind: 'l1' or 'l2'.
    reduction: 'mean' averages over every element. 'sum' sums over all but the batch axis and
      averages over the batch: LDM's `LPIPSWithDiscriminator` normalisation (`sum(nll) / B`),
      the one its `kl_weight=1e-6` was tuned against. With 'mean', the same balance needs
      kl_weight 1e-6 / (H * W * C).

  Returns:
    float32 scalar.
  """
  d = _f32(x) - _f32(y)
  if kind == 'l1':
    err = jnp.abs(d)
  elif kind == 'l2':
    err = jnp.square(d)
  else:
    raise ValueError(f"reconstruction kind {kind!r} is not 'l1' or 'l2'")
  if reduction == 'mean':
    return jnp.mean(err)
  if reduction == 'sum':
    return jnp.mean(_per_example(err, jnp.sum))
  raise ValueError(f"reconstruction reduction {reduction!r} is not 'mean' or 'sum'")


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent dims, averaged over the batch.

  Exactly LDM's `DiagonalGaussianDistribution.kl()` followed by `sum(kl) / B`:
  0.5 * sum_{h,w,c}(mean^2 + exp(logvar) - 1 - logvar), then the batch mean. (It is per example
  in nats, not per latent element: a 64x64x4 latent sums 16384 terms.)

  Args:
    mean: (B, h, w, c) posterior means (`AutoencoderKL.encode`'s first output).
    logvar: (B, h, w, c) posterior log-variances (already clipped to [-30, 20] by `encode`).

  Returns:
    float32 scalar.
  """
  mean, logvar = _f32(mean), _f32(logvar)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean(_per_example(kl, jnp.sum))


def hinge_d_loss(logits_real, logits_fake):
  """PatchGAN hinge loss for the discriminator: 0.5 (mean relu(1 - real) + mean relu(1 + fake))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def vanilla_d_loss(logits_real, logits_fake):
  """taming's logistic alternative: 0.5 (mean softplus(-real) + mean softplus(fake))."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real)))
                + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def generator_adv_loss(logits_fake):
  """The autoencoder's adversarial loss: -mean(discriminator logits on reconstructions)."""
  return -jnp.mean(_f32(logits_fake))


def adopt_weight(weight, step, threshold, value=0.0):
  """taming's `adopt_weight`: `value` before step `threshold` (disc_start), else `weight`."""
  return jnp.where(step < threshold, value, weight)


def adaptive_gan_weight(rec_grad_norm, gan_grad_norm, max_weight=1e4):
  """taming-transformers' `calculate_adaptive_weight`, given the two last-layer gradient norms.

  d_weight = clip(||grad rec|| / (||grad gan|| + 1e-4), 0, max_weight), with its gradient stopped,
  so the adversarial term's gradient at the decoder's last layer is scaled to the reconstruction
  term's. taming then multiplies by `discriminator_weight` (and the `adopt_weight` factor) outside
  the clip: total = rec + kl_weight * kl + disc_weight * d_weight * disc_factor * gan.

  Args:
    rec_grad_norm: L2 norm of d(reconstruction loss)/d(last layer kernel).
    gan_grad_norm: L2 norm of d(generator_adv_loss)/d(last layer kernel).
    max_weight: upper clip (taming: 1e4).

  Returns:
    float32 scalar constant (stop-gradient).
  """
  weight = _f32(rec_grad_norm) / (_f32(gan_grad_norm) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def last_layer_grad_norms(loss_fns_of_kernel, kernel):
  """Gradient norms of scalar losses w.r.t. one kernel (e.g. `decoder/conv_out/kernel`).

  PyTorch gets these with `torch.autograd.grad(loss, last_layer.weight)` on the already-built
  graph. JAX differentiates functions, not tensors, so each loss is written as a function of the
  kernel alone and differentiated with a nested `jax.grad` inside the outer loss:

    def rec_of(k):   # the reconstruction loss with the decoder's last kernel replaced by k
      p = replace_leaf(params, DECODER_LAST_LAYER, k)
      return reconstruction(images, vae.apply({'params': p}, z, method='decode'))
    def gan_of(k):   # the same reconstruction through the (frozen) discriminator
      p = replace_leaf(params, DECODER_LAST_LAYER, k)
      recon = vae.apply({'params': p}, z, method='decode')
      return generator_adv_loss(disc.apply({'params': disc_params}, recon))
    rn, gn = last_layer_grad_norms((rec_of, gan_of), params['decoder']['conv_out']['kernel'])
    d_weight = adaptive_gan_weight(rn, gn)

  Only conv_out's kernel varies, so the backward passes stop at conv_out; the decoder forward is
  recomputed per function unless XLA's CSE merges it with the main one. To skip it entirely,
  capture conv_out's input h once (`capture_intermediates` on `decoder/conv_norm_out`, then silu)
  and write each function as `k -> loss(conv(h, k) + bias)`. Close over `jax.lax.stop_gradient`
  copies of `params`, `z` and `h`: the weight is stop-gradient anyway, and this keeps the outer
  `jax.grad` from tracing second-order terms. The kernel is stop-gradient'ed here for the same
  reason.

  Args:
    loss_fns_of_kernel: a sequence of functions kernel -> float scalar.
    kernel: the current kernel (any shape).

  Returns:
    A tuple of float32 scalars, the Frobenius norm of each function's gradient at `kernel`.
  """
  kernel = jax.lax.stop_gradient(kernel)
  grads = [jax.grad(lambda k, fn=fn: _f32(fn(k)))(kernel) for fn in loss_fns_of_kernel]
  return tuple(jnp.sqrt(jnp.sum(jnp.square(_f32(g)))) for g in grads)


def replace_leaf(tree, path, value):
  """A copy of nested dict `tree` with the leaf at `path` ('a/b/c' or a tuple) set to `value`."""
  keys = tuple(path.split('/')) if isinstance(path, str) else tuple(path)
  if not keys:
    return value
  if keys[0] not in tree:
    raise KeyError(f'{keys[0]!r} not in the tree (keys: {sorted(tree)})')
  return {**tree, keys[0]: replace_leaf(tree[keys[0]], keys[1:], value)}


# ----------------------------------------------------------------------------- diffusion


def min_snr_weights(snr, gamma, prediction_type):
  """Min-SNR-gamma loss weights (Hang et al. 2023) as diffusers' train_text_to_image computes them.

  epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1); sample (x0):
  min(snr, gamma). At snr = 0 (zero-terminal-SNR schedules) the epsilon weight is its limit 1
  rather than 0/0; the v weight is 0 there.

  Args:
    snr: (B,) signal-to-noise ratios a_t / (1 - a_t) (`schedules.Schedule.snr(t)`).
    gamma: the clip (5 in the paper).
    prediction_type: 'epsilon', 'v_prediction' or 'sample'.

  Returns:
    (B,) float32 weights, stop-gradient.
  """
  snr = _f32(snr)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == 'epsilon':
    weights = jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  elif prediction_type == 'v_prediction':
    weights = clipped / (snr + 1.0)
  elif prediction_type == 'sample':
    weights = clipped
  else:
    raise ValueError(f'prediction_type {prediction_type!r} is not one of '
                     f'{schedules.PREDICTION_TYPES}')
  return jax.lax.stop_gradient(weights)


def diffusion_mse(pred, target, weights=None):
  """MSE per example (mean over all but the batch axis), then the (weighted) mean over the batch.

  The weighted mean is mean(w * mse), not sum(w * mse) / sum(w), as in diffusers.

  Args:
    pred: (B, ...) network output.
    target: (B, ...) its target (`schedules.training_target`).
    weights: optional (B,) per-example weights (e.g. `min_snr_weights`).

  Returns:
    float32 scalar.
  """
  per_example = _per_example(jnp.square(_f32(pred) - _f32(target)), jnp.mean)
  if weights is None:
    return jnp.mean(per_example)
  return jnp.mean(_f32(weights) * per_example)
