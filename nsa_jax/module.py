"""`NativeSparseAttention`: the NSA layer as a Flax NNX module (paper §3).

    x -> q, and per branch c in {cmp, slc, win}: k_c, v_c      (linear projections, GQA)
    k_cmp, v_cmp = phi(blocks of k_cmp / v_cmp + intra-block PE)   (paper Eq. 7)
    g = sigmoid(W_g x)                                         (paper Eq. 5)
    o = nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g)    (nsa_jax.ops.nsa)

What the paper leaves open (phi, the gates, RoPE on compressed keys at their block's last
token, positions restarting per document): docs/semantics.md#the-layer and #rope.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.context import sharded_nsa, with_halo
from nsa_jax.ops import _common, segments
from nsa_jax.ops import distill as distill_lib
from nsa_jax.ops.nsa import SAVE_POLICY, nsa
from nsa_jax.rope import apply_rope

BRANCHES = ("cmp", "slc", "win")


class CompressionMLP(nnx.Module):
  """phi: [B, N, l, H, D] blocks -> [B, N, H, D_out] (paper Eq. 7)."""

  def __init__(self, block: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (block, dim), param_dtype))
    hidden = 2 * dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(block * dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)

  def __call__(self, blocks):
    B, N, l, H, D = blocks.shape
    x = blocks + self.pos[...].astype(blocks.dtype)[None, None, :, None, :]
    x = jnp.moveaxis(x, 2, 3).reshape(B, N, H, l * D)
    return self.fc2(jax.nn.gelu(self.fc1(x)))


def compression_blocks(x, config: NSAConfig):
  """[B, T, H, D] -> [B, Tc, l, H, D]: block i holds tokens i*d .. i*d + l - 1.

  Block i is strides i .. i + l/d - 1 (d tokens each): the l/d shifted views of the
  strides, concatenated. Slices and a concatenation, no gather, so that the gradient
  is slices and adds rather than a scatter.
  """
  B, _, H, D = x.shape
  Tc, d = config.num_compressed(x.shape[1]), config.compress_stride
  S = config.compress_block // d
  if Tc == 0:    # T < l: no block (the strides below would need more tokens than T)
    return jnp.zeros((B, 0, config.compress_block, H, D), x.dtype)
  strides = x[:, :(Tc + S - 1) * d].reshape(B, Tc + S - 1, d, H, D)
  return jnp.concatenate([strides[:, s:s + Tc] for s in range(S)], axis=2)


def compressed_positions(num_blocks: int, config: NSAConfig):
  """Position of compressed block i for RoPE: its last token, i*d + l - 1."""
  return jnp.arange(num_blocks) * config.compress_stride + config.compress_block - 1


class NativeSparseAttention(nnx.Module):
  """Causal NSA self-attention layer: [B, T, d_model] -> [B, T, d_model].

  Args:
    d_model: model width.
    num_heads: query heads HQ; num_kv_heads: KV heads HKV (HQ % HKV == 0).
    head_dim / head_dim_v: Dk / Dv (default d_model // num_heads; Dv = Dk).
    config: NSA block sizes (NSAConfig).
    shared_kv: one K/V projection for the three branches instead of three
      (the paper uses separate ones to prevent shortcut learning, §3.3.3).
    rope_theta: RoPE base.
    impl: "xla", "pallas" or "auto" for the ops.
    dtype / param_dtype: compute and parameter dtypes (e.g. bf16 / f32).
    mesh: a device mesh with the axes of `nsa_jax.context.AXES`: the op then runs
      per shard (`nsa_jax.context.sharded_nsa`; sequences split over "context"
      exchange what crosses a shard boundary); None runs it whole.
    recompute: the backward recomputes the projections, keys, values, gates and the
      window and compressed branches from x (`__call__`, docs/memory.md); False keeps
      them instead: more memory, less time.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *,
               head_dim: int | None = None, head_dim_v: int | None = None,
               config: NSAConfig = NSAConfig(), shared_kv: bool = False,
               rope_theta: float = 10000.0, impl: str = "auto",
               dtype=jnp.float32, param_dtype=jnp.float32,
               mesh: jax.sharding.Mesh | None = None, recompute: bool = True,
               rngs: nnx.Rngs):
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a positive multiple of "
                       f"num_kv_heads={num_kv_heads}")
    if head_dim is None and d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not a multiple of num_heads={num_heads}: "
                       f"change one, or give head_dim")
    Dk = head_dim or d_model // num_heads
    Dv = head_dim_v or Dk
    if Dk < 2 or Dk % 2:
      raise ValueError(f"head_dim={Dk} must be even and >= 2 (RoPE); "
                       f"d_model={d_model}, num_heads={num_heads}")
    _common.check_config(config)
    _common.check_impl(impl)
    self.config, self.impl, self.rope_theta = config, impl, rope_theta
    self.mesh, self.d_model, self.recompute = mesh, d_model, recompute
    self.num_heads, self.num_kv_heads, self.dk, self.dv = num_heads, num_kv_heads, Dk, Dv
    self.kv_branches = 1 if shared_kv else len(BRANCHES)
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = nnx.Linear(d_model, num_heads * Dk, **kw)
    self.kv_proj = nnx.Linear(d_model, self.kv_branches * num_kv_heads * (Dk + Dv), **kw)
    self.o_proj = nnx.Linear(num_heads * Dv, d_model, **kw)
    self.gate = nnx.Linear(d_model, num_heads * len(BRANCHES), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    mlp_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.phi_k = CompressionMLP(config.compress_block, Dk, **mlp_kw)
    self.phi_v = CompressionMLP(config.compress_block, Dv, **mlp_kw)

  def branch_kv(self, x):
    """Un-rotated keys and values of each branch: {"cmp": (k, v), "slc": .., "win": ..}.

    k, v are [B, T, HKV, Dk] / [B, T, HKV, Dv] (the same arrays for every branch
    with shared_kv). kv_proj's output columns are head-major, [HKV, branches,
    Dk + Dv], so splitting them over the mesh axis "heads" splits whole KV heads.
    """
    B, T, _ = x.shape
    kv = self.kv_proj(x).reshape(B, T, self.num_kv_heads, self.kv_branches, self.dk + self.dv)
    def branch(c):
      i = 0 if self.kv_branches == 1 else BRANCHES.index(c)
      return kv[:, :, :, i, :self.dk], kv[:, :, :, i, self.dk:]
    return {c: branch(c) for c in BRANCHES}

  def compress(self, k, v, positions):
    """k_cmp, v_cmp [B, Tc, HKV, Dk / Dv] (paper Eq. 7) from the compressed branch's
    un-rotated keys and values [B, T, HKV, D]; k_cmp rotated at `positions` ([Tc] or
    [B, Tc]: its blocks' last tokens, in their documents for packed rows).

    On a mesh with context > 1 each shard compresses the T / (context * d) blocks that end
    in its tokens, from them and the l - d tokens before (`context.with_halo`): T/d slots
    in all, the first l/d - 1 of which lie before the sequence and are dropped.
    """
    c = self.config
    blocks, skip = (lambda x: compression_blocks(x, c)), 0
    chunks = 1 if self.mesh is None else self.mesh.shape["context"]
    if chunks > 1:
      T = k.shape[1]
      if T % (chunks * c.compress_stride):
        raise ValueError(f"T={T} must be a multiple of context={chunks} x compress_stride="
                         f"{c.compress_stride}: each shard compresses the blocks ending in it")
      halo = c.compress_block - c.compress_stride
      blocks = lambda x: with_halo(lambda e: compression_blocks(e, c), x, halo, self.mesh,
                                   heads=(2, 3))   # [B, T, H, D] -> [B, N, l, H, D]
      skip = c.compress_block // c.compress_stride - 1
    k_cmp = self.phi_k(blocks(k))[:, skip:]
    v_cmp = self.phi_v(blocks(v))[:, skip:]
    k_cmp = apply_rope(k_cmp, positions, self.rope_theta)
    return k_cmp, v_cmp

  def branch_inputs(self, x, positions=None, segment_ids=None):
    """Projects x [B, T, d_model] to the inputs of `nsa_jax.nsa`.

    positions: [T] or [B, T] RoPE positions of the tokens (default 0 .. T-1, or with
    segment_ids the position inside each token's document, docs/semantics.md#rope).
    Returns a dict with q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates.
    """
    B, T, _ = x.shape
    HQ, Dk = self.num_heads, self.dk
    cmp_pos = compressed_positions(self.config.num_compressed(T), self.config)
    if positions is not None:
      pos = positions
    elif segment_ids is None:
      pos = jnp.arange(T)
    else:   # positions in the documents; compressed block i's document starts at i*d
      pos = segments.positions_in_documents(segment_ids)
      cmp_pos = cmp_pos[None, :] - segments.document_starts(segment_ids)[
          :, cmp_pos - (self.config.compress_block - 1)]
    q = apply_rope(self.q_proj(x).reshape(B, T, HQ, Dk), pos, self.rope_theta)
    kv = self.branch_kv(x)
    k_cmp, v_cmp = self.compress(*kv["cmp"], cmp_pos)
    rope = lambda k: apply_rope(k, pos, self.rope_theta)
    gates = jax.nn.sigmoid(self.gate(x).reshape(B, T, HQ, len(BRANCHES)))
    dt = q.dtype
    return dict(q=q, k_cmp=k_cmp.astype(dt), v_cmp=v_cmp.astype(dt),
                k_slc=rope(kv["slc"][0]), v_slc=kv["slc"][1],
                k_win=rope(kv["win"][0]), v_win=kv["win"][1],
                gates=gates.astype(dt))

  def check_input(self, x) -> None:
    """ValueError unless x is [B, T, d_model], before anything is traced."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x.shape={tuple(x.shape)} must be [B, T, d_model={self.d_model}]")

  def __call__(self, x, segment_ids=None, distill=False, distill_stride=1):
    """Causal NSA over x [B, T, d_model] at positions 0 .. T-1, or over the documents
    of packed rows: segment_ids [B, T] int (docs/semantics.md#packed-rows).

    distill: also return the selection distillation loss of this call's q, k_cmp and
    k_slc (`nsa_jax.ops.distill.selection_distill_loss`, over every distill_stride-th
    chunk of queries; docs/selection_learning.md).

    The backward recomputes what is cheap (`nsa_jax.ops.nsa.SAVE_POLICY`): the layer
    keeps x and the branches' outputs, lse and selection, not the projections, keys,
    values, gates or mix made from x (docs/memory.md; measured: experiments/PERF_NOTES.md,
    "Memory"). Not with recompute=False, nor on a mesh with context > 1: recomputing there
    would all-gather the selected and compressed keys and values again (`nsa_jax.context`).
    """
    self.check_input(x)
    if not self.recompute or (self.mesh is not None and self.mesh.shape["context"] > 1):
      return self.forward(x, segment_ids, distill, distill_stride)
    # jax.checkpoint over the layer's state as an argument (not nnx.remat over the module),
    # so that a layer closed over by an outer jax.grad / jax.jit is read, never written.
    graphdef, state = nnx.split(self)
    forward = lambda state, x, segment_ids: nnx.merge(graphdef, state).forward(
        x, segment_ids, distill, distill_stride)
    return jax.checkpoint(forward, policy=SAVE_POLICY)(state, x, segment_ids)

  def forward(self, x, segment_ids=None, distill=False, distill_stride=1):
    """`__call__` without its checkpoint."""
    B, T, _ = x.shape
    op = nsa if self.mesh is None else sharded_nsa(self.mesh)
    inputs = self.branch_inputs(x, segment_ids=segment_ids)
    o = op(**inputs, config=self.config, impl=self.impl, segment_ids=segment_ids)
    y = self.o_proj(o.reshape(B, T, self.num_heads * self.dv))
    if not distill:
      return y
    return y, distill_lib.selection_distill_loss(inputs["q"], inputs["k_cmp"], inputs["k_slc"],
                                     config=self.config, segment_ids=segment_ids,
                                     query_stride=distill_stride, impl=self.impl)
