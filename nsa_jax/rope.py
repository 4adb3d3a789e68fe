"""Rotary position embedding (Su et al. 2021), shared by NSA and full attention."""
from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, theta: float = 10000.0):
  """Rotates pairs (x[..., i], x[..., i + D/2]) by positions * theta^(-2i/D).

  Args:
    x: [B, T, H, D] with D even.
    positions: [T] or [B, T] integer or float positions.
  Returns:
    x rotated, same shape and dtype.
  """
  D = x.shape[-1]
  if D % 2:
    raise ValueError(f"RoPE needs an even head dim, got D={D}")
  dt = jnp.promote_types(x.dtype, jnp.float32)    # float64 stays float64
  freq = theta ** (-jnp.arange(0, D // 2, dtype=dt) * 2.0 / D)
  pos = jnp.asarray(positions, dt)
  pos = pos[None] if pos.ndim == 1 else pos                     # [B or 1, T]
  ang = pos[..., None, None] * freq[None, None, None]                              # [B, T, 1, D/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = jnp.split(x.astype(dt), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
