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


def selection_scores(q, k_cmp, cfg, scale, doc_start=None):
  """Importance scores [B, T, HKV, Ts] with the explicit overlap weights
  (docs/semantics.md#importance-scores), the heads of a group summed or their max
  (cfg.group_score); doc_start [B, T]: the first position of each query's document
  (packed rows: blocks from it only)."""
  B, T, HQ, _ = q.shape
  HKV = k_cmp.shape[2]
  Tc = k_cmp.shape[1]
  Ts = -(-T // cfg.select_block)
  if Tc == 0:
    return np.zeros((B, T, HKV, Ts))
  mask = compressed_mask(B, T, HKV, cfg)
  if doc_start is not None:
    starts = np.arange(Tc) * cfg.compress_stride
    mask = mask & (starts[None, None, None, :] >= np.asarray(doc_start)[:, :, None, None])
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
  p_slc = (p @ W).reshape(B, T, HKV, G, Ts)
  return p_slc.sum(3) if cfg.group_score == "sum" else p_slc.max(3)


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


def selection_distill_loss(q, k_cmp, k_slc, cfg, scale, doc_start=None, queries=None):
  """The selection distillation loss (docs/selection_learning.md#selection-distillation),
  query by query, over the positions `queries` (default: all).

  Teacher: dense causal attention over k_slc (keys of t's document), averaged over
  a group's heads, summed per selection block; student: `selection_scores`; both
  over the free candidates (candidates not forced in), normalised; the mean of
  KL(teacher || student) over the (b, t, g) that have a free candidate.
  """
  B, T, HQ, _ = q.shape
  HKV = k_slc.shape[2]
  G, lp = HQ // HKV, cfg.select_block
  doc_start = np.zeros((B, T), int) if doc_start is None else np.asarray(doc_start)
  student = selection_scores(q, k_cmp, cfg, scale, doc_start)
  qq = np.asarray(q, np.float64)
  kk = np.repeat(np.asarray(k_slc, np.float64), G, axis=2)
  total, count = 0.0, 0
  for b in range(B):
    for t in range(T) if queries is None else queries:
      cur, first = t // lp, doc_start[b, t] // lp
      free = [j for j in range(first, cur + 1)
              if not (j < first + cfg.num_initial or j > cur - cfg.num_local)]
      if not free:
        continue
      keys = np.arange(doc_start[b, t], t + 1)
      for g in range(HKV):
        heads = range(g * G, (g + 1) * G)
        teacher = np.zeros(len(free))
        for h in heads:
          s = kk[b, keys, h] @ qq[b, t, h] * scale
          p = np.exp(s - s.max())
          p /= p.sum()
          for n, j in enumerate(free):
            teacher[n] += p[(keys >= j * lp) & (keys < (j + 1) * lp)].sum() / G
        teacher /= teacher.sum()
        st = student[b, t, g, free] / student[b, t, g, free].sum()
        total += np.sum(np.where(teacher > 0, teacher * np.log(teacher / st), 0.0))
        count += 1
  return total / max(count, 1)
