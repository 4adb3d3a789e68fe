"""Fused importance scores and top-n block selection as a Triton kernel (paper §3.3.2, Eq. 8-11).

The same op as `pallas_kernels/select_blocks.py` (read its docstring first) for
the case that matters inside `nsa`: the compressed branch's lse is given, so
p_cmp = exp(s - lse) takes one pass over the compressed keys. Written in
Triton's own language and launched with `jax_triton.triton_call`, because two
things it needs are awkward in Pallas: an in-register sort (`tl.topk`) for the
running top-n, and free reshapes of a tile. Reference: `select_blocks_xla` in
`nsa_jax/ops/selection.py`; results agree with it, and with the Pallas kernel,
except at near-ties (see the Pallas docstring: summation order differs).

An experiment (issue #3), not a code path of `nsa_jax`: on an H200 at T = 64k
it took 23.6 ms against the Pallas kernel's 12.8 ms
(`experiments/check_triton_select.py`, PERF_NOTES.md). Needs `triton` and
`jax_triton` (GPU only; carried as wheels); they are imported on first call,
so this module imports on a CPU machine without them.

Design (one program per (query tile of Bq tokens, KV group, batch)):

* Rows of the QK matmul are the Bq tokens x G heads of the tile (row r is
  token r // G, head r % G; G padded to a power of 2 with heads whose lse is
  +inf, so p = 0). The [Bq*G, Dk] query tile is loaded once; each compressed
  key tile is loaded once per program and serves all G heads in one matmul
  (the Pallas kernel loops over heads, re-reading q and k per head). Bq =
  Tiles.block_q // G, at least 16: Bq = 16 at G = 16 (256 rows), 256 at G = 1.
* The selection blocks are walked in chunks of `Sc` blocks, whose compressed
  blocks fit one key tile of `block_k` rows (Sc = 15 at the paper's sizes and
  block_k = 64, as in the Pallas kernel). Per chunk: s = scale * q k^T
  [Bq*G, block_k], p = exp(s - lse) where visible (Eq. 8), summed over the G
  heads by a reshape to [Bq, G, block_k] (Eq. 10), then mapped to the chunk's
  [Bq, W] block scores by the 0/1/2 overlap matrix (Eq. 9), a matmul kept at
  float32 accuracy by splitting p into three bf16 pieces.
* Running top-n with a sort: each (score, block) pair becomes one int64 key,
  float32 bits of the score (>= 0, or +inf when forced) in the high word and
  2^31-1-j in the low word, so that key order is score order with ties to
  the lower index (Eq. 11); non-candidates get -1. The W best keys so far and
  the chunk's W keys are joined into [Bq, 2W] and `tl.topk` (a bitonic
  top-k in registers) keeps the W best: ~15 compare-exchange steps per chunk
  whatever the scores, instead of up to n passes of max-and-mask.
  W = max(n, Sc) rounded up to a power of 2 (16 at the paper's sizes); the
  result is the first n of the final sorted W (ties were already broken).
* Tiles are walked last-first (the causal work grows with t).

Padding done by the wrapper: T to a multiple of Bq, G to a power of 2, Dk to
a power of 2 >= 16 (zeros; Dk = 192 is read as 256). Keys outside
[0, Tc) are masked by index in the load.

No custom_vjp: the output is integer and the inputs carry no gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from pallas_kernels import select_blocks as pallas_select

LOW_WORD = 2**31 - 1         # key low word = LOW_WORD - block index
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")


# Tile sizes and launch parameters: the Pallas kernel's `Tiles`, with block_q
# counting QK matmul rows per program (tokens x padded heads): the tile takes
# max(16, block_q // G) tokens (shrunk for short sequences).
Tiles = pallas_select.Tiles
DEFAULT_TILES = Tiles(block_q=256, block_k=64, num_warps=8, num_stages=2)


def _next_pow2(x: int, at_least: int = 1) -> int:
  return max(at_least, 1 << max(0, x - 1).bit_length())


@functools.cache
def triton_kernel():
  """The @triton.jit kernel (built on first use: triton is an optional import)."""
  import triton
  import triton.language as tl

  @triton.jit
  def select_kernel(q_ptr, k_ptr, lse_ptr, out_ptr,
                    seq_len: tl.constexpr, num_cmp: tl.constexpr, k_rows: tl.constexpr,
                    num_heads_kv: tl.constexpr, num_tiles: tl.constexpr,
                    scale: tl.constexpr, compress_block: tl.constexpr,
                    compress_stride: tl.constexpr, select_block: tl.constexpr,
                    num_initial: tl.constexpr, num_local: tl.constexpr,
                    block_q: tl.constexpr, group: tl.constexpr, dk: tl.constexpr,
                    block_k: tl.constexpr, chunk: tl.constexpr, width: tl.constexpr,
                    low_word: tl.constexpr):
    """One (query tile, KV group, batch) program.

    q_ptr [B, Tpad, HKV, group, dk], k_ptr [B, k_rows, HKV, dk] (k_rows = max(Tc, 1)),
    lse_ptr [B, Tpad, HKV, group] float32, out_ptr [B, Tpad, HKV, width] int32.
    """
    tile = num_tiles - 1 - tl.program_id(0)           # longest tiles first
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    per_block: tl.constexpr = compress_block // compress_stride
    per_select: tl.constexpr = select_block // compress_stride
    rows: tl.constexpr = block_q * group
    t0 = tile * block_q
    # Flat offset of (b, t0, g) in the [B, Tpad, HKV, ...] arrays.
    tile_base = (b * (num_tiles * block_q) + t0) * num_heads_kv + g

    r = tl.arange(0, rows)
    t_row = t0 + r // group                                        # [R]
    row_off = (r // group) * (num_heads_kv * group) + r % group
    dcol = tl.arange(0, dk)
    q = tl.load(q_ptr + tile_base * (group * dk)
                + (row_off * dk)[:, None] + dcol[None, :])         # [R, dk]
    lse = tl.load(lse_ptr + tile_base * group + row_off)           # [R]

    t_tok = t0 + tl.arange(0, block_q)                             # [Bq]
    current = (t_tok // select_block)[:, None]                     # [Bq, 1]
    col = tl.arange(0, width)
    kk = tl.arange(0, block_k)
    k_base = k_ptr + (b * k_rows * num_heads_kv + g) * dk

    t_last = tl.minimum(t0 + block_q - 1, seq_len - 1)
    num_chunks = (t_last // select_block) // chunk + 1
    best = tl.full([block_q, width], -1, tl.int64)
    for c in range(num_chunks):
      # Compressed blocks overlapping selection blocks c*chunk .. c*chunk + chunk - 1.
      i = c * chunk * per_select - (per_block - 1) + kk          # [BK]
      valid = (i >= 0) & (i < num_cmp)
      k = tl.load(k_base + (i * (num_heads_kv * dk))[:, None] + dcol[None, :],
                  mask=valid[:, None], other=0.0)                # [BK, dk]
      s = tl.dot(q, tl.trans(k)) * scale                         # [R, BK] f32
      # Key i is visible to token t iff i*d + l - 1 <= t (Eq. 8's softmax domain).
      first_seen = tl.where(valid, i * compress_stride + compress_block - 1,
                            seq_len + num_tiles * block_q)
      p = tl.where(first_seen[None, :] <= t_row[:, None],
                   tl.exp(s - lse[:, None]), 0.0)
      p = tl.sum(tl.reshape(p, [block_q, group, block_k]), axis=1)   # [Bq, BK]

      j = c * chunk + col                                        # [W]
      overlap = (tl.minimum(i[:, None] + per_block, (j[None, :] + 1) * per_select)
                 - tl.maximum(i[:, None], j[None, :] * per_select))
      weights = tl.where(col[None, :] < chunk, tl.maximum(overlap, 0), 0).to(tl.bfloat16)
      # p @ weights at float32 accuracy: p in three bf16 pieces (weights are exact in bf16).
      scores = tl.zeros([block_q, width], tl.float32)              # [Bq, W]
      for _ in tl.static_range(3):
        piece = p.to(tl.bfloat16)
        scores = tl.dot(piece, weights, scores)
        p = p - piece.to(tl.float32)

      candidate = (j[None, :] <= current) & (col[None, :] < chunk)
      forced = candidate & ((j[None, :] < num_initial)
                            | (j[None, :] > current - num_local))
      bits = tl.where(scores > 0, scores.to(tl.int32, bitcast=True), 0)
      bits = tl.where(forced, 0x7F800000, bits)                  # +inf
      keys = tl.where(candidate,
                      (bits.to(tl.int64) << 32) | (low_word - j[None, :]).to(tl.int64),
                      -1)
      best = tl.topk(tl.reshape(tl.join(best, keys), [block_q, 2 * width]), width)

    block = tl.where(best < 0, -1, low_word - (best & low_word).to(tl.int32))
    tok_off = tl.arange(0, block_q) * (num_heads_kv * width)
    tl.store(out_ptr + tile_base * width + tok_off[:, None] + col[None, :], block)

  return select_kernel


def launch_plan(q_shape, k_shape, dtype, *, config: NSAConfig, scale: float,
                tiles: Tiles) -> dict:
  """Padded sizes, grid and constexpr parameters of one launch (shared with tests)."""
  B, T, HQ, Dk = q_shape
  Tc, HKV = k_shape[1], k_shape[2]
  G = HQ // HKV
  if jnp.dtype(dtype).name not in SUPPORTED_DTYPES:
    raise ValueError(f"q.dtype={jnp.dtype(dtype).name} is not supported by the "
                     f"Triton select kernel (supported: {SUPPORTED_DTYPES})")
  l, d = config.compress_block, config.compress_stride
  front = l // d - 1
  per_select = config.select_block // d
  group = _next_pow2(G)
  block_q = min(max(16, tiles.block_q // group), _next_pow2(T, 16))
  num_blocks = config.num_select_blocks(T)
  chunk = max(1, min((tiles.block_k - front) // per_select, num_blocks))
  block_k = _next_pow2(chunk * per_select + front, 16)
  width = max(16, _next_pow2(config.num_selected), _next_pow2(chunk))
  num_tiles = -(-T // block_q)
  params = dict(
      seq_len=T, num_cmp=Tc, k_rows=max(Tc, 1), num_heads_kv=HKV, num_tiles=num_tiles,
      scale=float(scale), compress_block=l, compress_stride=d,
      select_block=config.select_block, num_initial=config.num_initial,
      num_local=config.num_local, block_q=block_q, group=group,
      dk=_next_pow2(Dk, 16), block_k=block_k, chunk=chunk, width=width,
      low_word=LOW_WORD)
  return {"params": params, "grid": (num_tiles, HKV, B),
          "out_shape": (B, num_tiles * block_q, HKV, width),
          "num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


def pad_inputs(q, k_cmp, lse, plan: dict):
  """q, k_cmp, lse padded to the plan's sizes (no copy where none is needed)."""
  p = plan["params"]
  B, T, HQ, Dk = q.shape
  HKV = k_cmp.shape[2]
  G = HQ // HKV
  t_pad = p["num_tiles"] * p["block_q"] - T
  g_pad, d_pad = p["group"] - G, p["dk"] - Dk
  q = q.reshape(B, T, HKV, G, Dk)
  if t_pad or g_pad or d_pad:
    q = jnp.pad(q, [(0, 0), (0, t_pad), (0, 0), (0, g_pad), (0, d_pad)])
  if d_pad or k_cmp.shape[1] == 0:
    k_cmp = jnp.pad(k_cmp, [(0, 0), (0, int(k_cmp.shape[1] == 0)), (0, 0),
                            (0, d_pad)])
  # Padded heads get lse = +inf (p = 0); padded tokens 0 (dropped).
  lse = lse.astype(jnp.float32).reshape(B, T, HKV, G)
  if g_pad:
    lse = jnp.pad(lse, [(0, 0), (0, 0), (0, 0), (0, g_pad)],
                  constant_values=jnp.inf)
  if t_pad:
    lse = jnp.pad(lse, [(0, 0), (0, t_pad), (0, 0), (0, 0)])
  return q, k_cmp, lse


@functools.partial(jax.jit, static_argnames=("config", "scale", "tiles"))
def select_blocks(q, k_cmp, *, config: NSAConfig, scale: float, lse,
                  tiles: Tiles = DEFAULT_TILES):
  """Top-n selection blocks per query and KV group, as `select_blocks_xla(..., lse=lse)`.

  Args:
    q: [B, T, HQ, Dk] bf16, f16 or f32; k_cmp: [B, Tc, HKV, Dk],
      Tc = config.num_compressed(T).
    config, scale: as in `nsa_jax.select_blocks` (scale a python float).
    lse: [B, T, HQ] natural-log lse of the compressed branch (-inf where
      nothing is visible), as returned by `compressed_attention`.
    tiles: tile sizes and launch parameters.

  Returns:
    block_idx [B, T, HKV, n] int32, -1 in unused slots, order free.
  """
  import jax_triton

  T = q.shape[1]
  plan = launch_plan(q.shape, k_cmp.shape, q.dtype, config=config, scale=scale,
                     tiles=tiles)
  q, k_cmp, lse = pad_inputs(q, k_cmp, lse, plan)
  out = jax_triton.triton_call(
      q, k_cmp, lse, kernel=triton_kernel(),
      out_shape=jax.ShapeDtypeStruct(plan["out_shape"], jnp.int32),
      grid=plan["grid"], num_warps=plan["num_warps"],
      num_stages=plan["num_stages"], name="nsa_select_blocks_triton",
      **plan["params"])
  return out[:, :T, :, :config.num_selected]
