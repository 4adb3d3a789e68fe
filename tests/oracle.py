"""Brute-force NumPy (float64) oracles for the NSA ops, written from docs/semantics.md alone.

They build the full [T, S] visibility mask of each branch and run dense masked
attention, so they share no code with nsa_jax's chunked references.
"""
import numpy as np


def dense_attention(q, k, v, mask, scale):
  """q [B,T,HQ,Dk], k [B,S,HKV,Dk], v [B,S,HKV,Dv], mask [B,T,HKV,S] bool.

  Returns (o [B,T,HQ,Dv], lse [B,T,HQ]); rows with nothing visible give 0, -inf.
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, HQ, _ = q.shape
  G = HQ // k.shape[2]
  k = np.repeat(k, G, axis=2)
  v = np.repeat(v, G, axis=2)
  m = np.repeat(np.asarray(mask), G, axis=2)                 # [B,T,HQ,S]
  s = np.einsum("bthd,bshd->bths", q, k) * scale
  s = np.where(m, s, -np.inf)
  mx = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  e = np.where(m, np.exp(s - mx), 0.0)
  den = e.sum(-1, keepdims=True)
  p = e / np.where(den > 0, den, 1.0)
  with np.errstate(divide="ignore"):
    lse = np.where(den[..., 0] > 0, mx[..., 0] + np.log(den[..., 0]), -np.inf)
  return np.einsum("bths,bshd->bthd", p, v), lse


def compressed_mask(B, T, HKV, cfg):
  Tc = cfg.num_compressed(T)
  t = np.arange(T)[:, None]
  i = np.arange(Tc)[None, :]
  m = i * cfg.compress_stride + cfg.compress_block - 1 <= t
  return np.broadcast_to(m[None, :, None, :], (B, T, HKV, Tc))


def window_mask(B, T, HKV, cfg):
  t = np.arange(T)[:, None]
  s = np.arange(T)[None, :]
  m = (s <= t) & (s > t - cfg.window)
  return np.broadcast_to(m[None, :, None, :], (B, T, HKV, T))


def selected_mask(block_idx, T, cfg):
  bi = np.asarray(block_idx)
  B, _, HKV, _ = bi.shape
  s = np.arange(T)
  blk = s // cfg.select_block                                    # [S]
  chosen = (bi[..., None] == blk).any(axis=3)                    # [B,T,HKV,S]
  return chosen & (s[None, None, None, :] <= np.arange(T)[None, :, None, None])


def selection_scores(q, k_cmp, cfg, scale):
  """Importance scores [B, T, HKV, Ts] with the explicit overlap weights
  (docs/semantics.md#importance-scores)."""
  B, T, HQ, _ = q.shape
  HKV = k_cmp.shape[2]
  Tc = k_cmp.shape[1]
  Ts = -(-T // cfg.select_block)
  if Tc == 0:
    return np.zeros((B, T, HKV, Ts))
  mask = compressed_mask(B, T, HKV, cfg)
  G = HQ // HKV
  qq = np.asarray(q, np.float64)
  kk = np.repeat(np.asarray(k_cmp, np.float64), G, axis=2)
  s = np.einsum("bthd,bshd->bths", qq, kk) * scale
  s = np.where(np.repeat(mask, G, axis=2), s, -np.inf)
  mx = s.max(-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  e = np.exp(s - mx)
  den = e.sum(-1, keepdims=True)
  p = e / np.where(den > 0, den, 1.0)                            # [B,T,HQ,Tc]
  l, d, lp = cfg.compress_block, cfg.compress_stride, cfg.select_block
  W = np.zeros((Tc, Ts))
  for i in range(Tc):
    for j in range(Ts):
      W[i, j] = max(0, min(i * d + l, (j + 1) * lp) - max(i * d, j * lp)) / d
  p_slc = p @ W                                                  # [B,T,HQ,Ts]
  return p_slc.reshape(B, T, HKV, G, Ts).sum(3)


def select_blocks(q, k_cmp, cfg, scale):
  """Sorted list of selected blocks per [b, t, g] (as Python sets) and the scores."""
  sc = selection_scores(q, k_cmp, cfg, scale)
  B, T, HKV, Ts = sc.shape
  out = np.empty((B, T, HKV), dtype=object)
  for b in range(B):
    for t in range(T):
      cur = t // cfg.select_block
      for g in range(HKV):
        cands = list(range(cur + 1))
        forced = [j for j in cands
                  if j < cfg.num_initial or j > cur - cfg.num_local]
        rest = sorted((j for j in cands if j not in forced),
                      key=lambda j: (-sc[b, t, g, j], j))
        out[b, t, g] = set(forced + rest[: cfg.num_selected - len(forced)])
  return out, sc
