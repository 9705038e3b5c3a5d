"""Scaled dot-product attention, the one place every network attends, with a kernel per backend.

`impl='auto'` (the SD configs' choice) picks per call, at trace time, from `jax.default_backend()`
and what the call needs:

  GPU: cuDNN flash attention ('cudnn') for unmasked bf16/fp16 calls whose head dim it takes
       (a multiple of 8, at most 128, or 256 from Hopper on; CUDA compute capability >= 8.0);
       otherwise 'xla' (fp32 compute, the VAE's 512-wide head, the text encoder's causal mask).
  TPU: the Pallas TPU flash attention kernel ('pallas') for unmasked fp32/bf16 calls; padded
       here to whole blocks, so any sequence length and head dim; otherwise 'xla'.
  CPU and anything else: 'xla', the query-chunked einsum path.

A mask (the text encoder's causal one) always takes the 'xla' path, also under an explicit
'cudnn' or 'pallas': cuDNN takes a boolean mask only as a dense bias, which it cannot
differentiate at the text encoder's 77 tokens (odd), and the Pallas kernel has no dense mask.
The text encoder's attention is a rounding error of the step's cost.
"""

import functools
import math

import jax
from jax.experimental import custom_partitioning
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
import jax.numpy as jnp

P = jax.sharding.PartitionSpec

IMPLS = ('auto', 'xla', 'jax', 'cudnn', 'pallas')


def dot_product_attention(q, k, v, *, impl='xla', mask=None, upcast=True):
  """Scaled dot-product attention.

  Args:
    q: (B, Lq, H, D) queries.
    k: (B, Lk, H, D) keys.
    v: (B, Lk, H, D) values.
    impl: one of IMPLS. 'xla': einsum + float32 softmax, any backend (query-chunked on CPU);
      'jax': `jax.nn.dot_product_attention`, which lets JAX pick the kernel; 'cudnn': cuDNN
      flash attention (GPU, bf16/fp16 only); 'pallas': the Pallas TPU flash attention kernel
      (TPU; on CPU only inside `pltpu.force_tpu_interpret_mode()`); 'auto': the backend's
      kernel where it takes the call, else 'xla' (see the module docstring and `resolve_impl`).
    mask: optional boolean mask broadcastable to (B, H, Lq, Lk); True keeps a position.
    upcast: compute the logits in float32 (diffusers' `upcast_attention`); the softmax is float32
      whatever this says. The flash kernels ('cudnn', 'pallas') always keep their logits in
      float32, so they honour upcast=True and are more exact than asked for under False.

  Returns:
    (B, Lq, H, D) in q's dtype.

  Raises:
    ValueError: an impl that is not one of IMPLS.
  """
  impl = resolve_impl(impl, q, k, mask)
  scale = 1.0 / math.sqrt(q.shape[-1])
  if impl in ('jax', 'cudnn'):
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation=None if impl == 'jax' else 'cudnn')
  if impl == 'pallas':
    return _pallas_attention(q, k, v)
  return _xla_attention_chunked(q, k, v, mask, upcast)


def resolve_impl(impl, q, k, mask=None):
  """The implementation a call runs: `impl` itself, or for 'auto' the backend's kernel or 'xla'.

  Args:
    impl: one of IMPLS.
    q: (B, Lq, H, D) queries (arrays or tracers: only shapes and dtypes are read).
    k: (B, Lk, H, D) keys.
    mask: the call's mask, or None.

  Returns:
    One of 'xla', 'jax', 'cudnn' or 'pallas'.

  Raises:
    ValueError: an impl that is not one of IMPLS.
  """
  if impl not in IMPLS:
    raise ValueError(f'attention impl {impl!r} is not one of {IMPLS}')
  if mask is not None and impl in ('auto', 'cudnn', 'pallas'):
    return 'xla'  # neither flash kernel takes a dense mask (module docstring)
  if impl != 'auto':
    return impl
  backend = jax.default_backend()
  if backend == 'gpu' and _cudnn_takes(q, k):
    return 'cudnn'
  if backend == 'tpu' and q.dtype in (jnp.float32, jnp.bfloat16) and k.dtype == q.dtype:
    return 'pallas'
  return 'xla'


def _cudnn_takes(q, k):
  """Whether cuDNN flash attention (as `jax.nn.dot_product_attention` checks it) takes the call."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return False
  capability = _cuda_capability()
  head_dim_max = 256 if capability >= (9, 0) else 128
  return capability >= (8, 0) and q.shape[-1] % 8 == 0 and q.shape[-1] <= head_dim_max


def _cuda_capability():
  """The first local GPU's compute capability as (major, minor); (0, 0) off CUDA (ROCm)."""
  device = jax.local_devices()[0]
  if 'cuda' not in device.client.platform_version.lower():
    return (0, 0)
  return tuple(int(x) for x in device.compute_capability.split('.'))


# --------------------------------------------------------------------------------------------- XLA

# On CPU, attention over many keys is memory-bound: (B, H, Lq, Lk) float32 logits (64 MiB for
# a 32x32 latent at batch 2) go through memory several times. Looping over chunks of query rows
# keeps each chunk's logits near the caches; 64K logits per (example, head) measured fastest
# (bench/NOTES.md). Accelerators keep the single einsum (their memory is fast, loops are not).
CPU_QUERY_CHUNK_LOGITS = 1 << 16


def _xla_attention_chunked(q, k, v, mask, upcast):
  """The 'xla' impl: one einsum attention, or on CPU a loop over query chunks."""
  # Scaling q before the product (rather than the logits after) is what PyTorch SDPA does.
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  logits_dtype = jnp.float32 if upcast else q.dtype
  chunk = _query_chunk(q.shape[1], k.shape[1]) if mask is None else q.shape[1]
  if chunk == q.shape[1]:
    return _xla_attention(q, k, v, mask, logits_dtype)
  return _chunked_attention(q, k, v, chunk, jnp.dtype(logits_dtype))


def _to_chunks(t, chunk):  # (B, L, ...) -> (L/chunk, B, chunk, ...): one loop iteration per chunk
  return jnp.moveaxis(t.reshape((t.shape[0], -1, chunk) + t.shape[2:]), 1, 0)


def _from_chunks(t):  # (L/chunk, B, chunk, ...) -> (B, L, ...)
  return jnp.moveaxis(t, 0, 1).reshape((t.shape[1], -1) + t.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_attention(q, k, v, chunk, logits_dtype):
  """Attention of pre-scaled q in a loop over chunks of `chunk` query rows (see _query_chunk)."""
  attend = lambda qc: _xla_attention(qc, k, v, None, logits_dtype)
  return _from_chunks(jax.lax.map(attend, _to_chunks(q, chunk)))


def _chunked_attention_fwd(q, k, v, chunk, logits_dtype):
  attend = lambda qc: _xla_attention(qc, k, v, None, logits_dtype, with_lse=True)
  out, lse = jax.lax.map(attend, _to_chunks(q, chunk))  # lse: (L/chunk, B, H, chunk)
  out = _from_chunks(out)
  return out, (q, k, v, out, lse)


def _chunked_attention_bwd(chunk, logits_dtype, residuals, g):
  """Flash attention's backward: per chunk, the probabilities from the saved log-sum-exp.

  Recomputing each chunk's logits (rather than storing them) keeps them near the caches; the
  saved log-sum-exp spares the max and sum passes, and the row sums of dP * P come from the
  (Lq, D) output. The key and value gradients are products of the transposed (chunk, Lk)
  dS and P: written as (D, chunk) x (chunk, Lk) products, whose (B, H, D, Lk) results are
  accumulated and transposed once, so that XLA:CPU never transposes a (chunk, Lk) operand
  (the autodiff orientation, (Lk, chunk) x (chunk, D), ran 4-7x slower).
  """
  q, k, v, out, lse = residuals
  # (B, Lq, H): sum_k dP * P = sum_d dO * O, per query row.
  delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  b, lk, h, d = k.shape

  def step(carry, xs):
    dk_t, dv_t = carry
    qc, gc, lse_c, delta_c = xs
    logits = jnp.einsum('bqhd,bkhd->bhqk', qc, k, preferred_element_type=logits_dtype)
    p = jnp.exp(logits.astype(jnp.float32) - lse_c[..., None])  # (B, H, chunk, Lk)
    dv_t = dv_t + jnp.einsum('bqhd,bhqk->bhdk', gc.astype(v.dtype), p.astype(v.dtype),
                             preferred_element_type=jnp.float32)
    dp = jnp.einsum('bqhd,bkhd->bhqk', gc.astype(v.dtype), v, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.swapaxes(delta_c, 1, 2)[..., None])
    dq = jnp.einsum('bhqk,bkhd->bhqd', ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk_t = dk_t + jnp.einsum('bqhd,bhqk->bhdk', qc, ds.astype(q.dtype),
                             preferred_element_type=jnp.float32)
    return (dk_t, dv_t), jnp.swapaxes(dq, 1, 2).astype(q.dtype)

  zeros = jnp.zeros((b, h, d, lk), jnp.float32)
  xs = (_to_chunks(q, chunk), _to_chunks(g, chunk), lse, _to_chunks(delta, chunk))
  (dk_t, dv_t), dq = jax.lax.scan(step, (zeros, zeros), xs)
  to_keys = lambda t, like: jnp.transpose(t, (0, 3, 1, 2)).astype(like.dtype)  # -> (B, Lk, H, D)
  return _from_chunks(dq), to_keys(dk_t, k), to_keys(dv_t, v)


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


def _query_chunk(lq, lk):
  """Query rows per chunk: all of them, or on CPU the largest divisor of lq within the budget."""
  if jax.default_backend() != 'cpu' or lq * lk <= CPU_QUERY_CHUNK_LOGITS:
    return lq
  chunk = max(CPU_QUERY_CHUNK_LOGITS // lk, 1)
  while lq % chunk:
    chunk -= 1
  return chunk


def _xla_attention(q, k, v, mask, logits_dtype, with_lse=False):
  """Einsum attention of pre-scaled q; normalises after the value product (Lq x D, not Lq x Lk).

  With `with_lse`, also returns the logits' log-sum-exp, (B, H, Lq) float32.
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=logits_dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  # Softmax in float32: bf16 softmax over 4096 keys loses most of its mass to rounding.
  logits = logits.astype(jnp.float32)
  row_max = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  unnormalised = jnp.exp(logits - row_max)
  out = jnp.einsum('bhqk,bkhd->bhqd', unnormalised.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  total = unnormalised.sum(axis=-1, keepdims=True)
  out = jnp.swapaxes(out / total, 1, 2).astype(v.dtype)
  if with_lse:
    return out, (row_max + jnp.log(total))[..., 0]
  return out


# ------------------------------------------------------------------------------------ Pallas (TPU)

# The kernel tiles sequences in blocks that are multiples of its 128 lanes and wants a head dim
# of at most 128 or a multiple of 128. Sequences are padded to a multiple of 128 and tiled in
# the largest of these blocks that divides them; head dims are zero-padded up to a multiple of
# 128 (zeros add nothing to q.k, and padded value columns are cut from the output). The blocks
# are the kernel's usual sizes, not tuned on a TPU here.
PALLAS_LANES = 128
PALLAS_BLOCKS = (512, 256, 128)


def _pallas_attention(q, k, v):
  """The 'pallas' impl on (B, L, H, D); on TPU run per batch/head shard of a multi-device jit."""
  if jax.default_backend() == 'tpu':
    return _per_shard(_pallas_local, q, k, v)
  # Elsewhere the kernel only runs in TPU interpret mode (tests), whose callbacks cannot sit
  # inside a custom partitioning; it runs as it is.
  return _pallas_local(q, k, v)


def _round_up(n, multiple):
  return -(-n // multiple) * multiple


def _pallas_blocks(length):
  """(block, padded length): `length` padded to a multiple of 128, the largest block dividing it."""
  padded = _round_up(length, PALLAS_LANES)
  return next(b for b in PALLAS_BLOCKS if padded % b == 0), padded


def _pallas_local(q, k, v):
  """The Pallas kernel on (B, L, H, D) arrays of one device, padded to its blocks and back."""
  b, lq, _, d = q.shape
  lk = k.shape[1]
  block_q, lq_padded = _pallas_blocks(lq)
  block_k, lk_padded = _pallas_blocks(lk)
  d_padded = _round_up(d, PALLAS_LANES)

  def to_kernel_layout(t, length):  # (B, L, H, D) -> (B, H, L_padded, D_padded)
    t = jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0), (0, d_padded - d)))
    return jnp.swapaxes(t, 1, 2)

  segment_ids = None
  if lk_padded != lk:  # padded keys get segment 0, which no query (all segment 1) attends to
    kv_ids = jnp.broadcast_to((jnp.arange(lk_padded) < lk).astype(jnp.int32), (b, lk_padded))
    segment_ids = tpu_flash.SegmentIds(q=jnp.ones((b, lq_padded), jnp.int32), kv=kv_ids)
  blocks = tpu_flash.BlockSizes(
      block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
      block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k,
      block_q_dkv=block_q, block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q)
  out = tpu_flash.flash_attention(
      to_kernel_layout(q, lq_padded), to_kernel_layout(k, lk_padded),
      to_kernel_layout(v, lk_padded), segment_ids=segment_ids, sm_scale=1.0 / math.sqrt(d),
      block_sizes=blocks)
  return jnp.swapaxes(out, 1, 2)[:, :lq, :, :d]


# ------------------------------------------------------------------------------- per-shard kernels

# XLA cannot partition a Mosaic (Pallas TPU) kernel: inside a jit over several devices it fails
# to lower ("Mosaic kernels cannot be automatically partitioned"). Attention is independent per
# example and head, so `_per_shard` has the partitioner run the kernel on each device's
# batch/head shard of whole sequences and head dims (a sharding of L or D is gathered first).
# It needs no mesh: it follows whatever shardings the jit gives q, k and v. The price: the
# backward runs the forward kernel once more (as remat would), since the kernel's public API
# does not hand out its softmax statistics.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_shard(kernel, q, k, v):
  """kernel(q, k, v) on (B, L, H, D) arrays, run on each device's batch/head shard."""
  return _partitioned_fwd(kernel, q, k, v)


def _per_shard_fwd(kernel, q, k, v):
  return _partitioned_fwd(kernel, q, k, v), (q, k, v)


def _per_shard_bwd(kernel, residuals, g):
  return _partitioned_bwd(kernel, *residuals, g)


_per_shard.defvjp(_per_shard_fwd, _per_shard_bwd)


def _local_fwd(kernel, q, k, v):
  return kernel(q, k, v)


def _local_bwd(kernel, q, k, v, g):
  """The kernel's VJP on one shard, recomputing its forward (its API keeps the residuals)."""
  return jax.vjp(kernel, q, k, v)[1](g)


def _shard_spec(mesh, arg):
  """`arg`'s sharding on the batch (0) and head (2) axes; L and D replicated."""
  spec = () if arg.sharding is None else tuple(arg.sharding.spec)
  spec += (None,) * (arg.ndim - len(spec))
  return jax.sharding.NamedSharding(mesh, P(spec[0], None, spec[2], None))


def _fwd_partition(kernel, mesh, args, result):
  del result
  sharding = _shard_spec(mesh, args[0])  # k and v follow q
  return mesh, functools.partial(_local_fwd, kernel), sharding, (sharding,) * 3


def _bwd_partition(kernel, mesh, args, result):
  del result
  sharding = _shard_spec(mesh, args[0])
  return mesh, functools.partial(_local_bwd, kernel), (sharding,) * 3, (sharding,) * 4


def _fwd_out_sharding(kernel, mesh, args, result):
  del kernel, result
  return _shard_spec(mesh, args[0])


def _bwd_out_sharding(kernel, mesh, args, result):
  del kernel, result
  return (_shard_spec(mesh, args[0]),) * 3


# Shardy's rule: batch and heads may stay sharded; q, k (lengths) and d must be whole, listed in
# the order the factors first appear, as Shardy requires.
_REPLICATED = ('q', 'd', 'k')
_partitioned_fwd = custom_partitioning.custom_partitioning(_local_fwd, static_argnums=(0,))
_partitioned_fwd.def_partition(
    _fwd_partition, infer_sharding_from_operands=_fwd_out_sharding,
    sharding_rule='b q h d, b k h d, b k h d -> b q h d', need_replication_factors=_REPLICATED)
_partitioned_bwd = custom_partitioning.custom_partitioning(_local_bwd, static_argnums=(0,))
_partitioned_bwd.def_partition(
    _bwd_partition, infer_sharding_from_operands=_bwd_out_sharding,
    sharding_rule='b q h d, b k h d, b k h d, b q h d -> b q h d, b k h d, b k h d',
    need_replication_factors=_REPLICATED)
