"""A decoder-only transformer language model whose attention is NSA or full attention.

Pre-norm blocks (RMSNorm), RoPE, SwiGLU MLP, tied or untied embeddings, as in
the NSA paper's backbone (§4.1: GQA + MoE; here a dense MLP). The attention is
`"nsa"` (`nsa_jax.module.NativeSparseAttention`) or `"full"`: dense causal
attention (`nsa_jax.ops.dense`, on the backends the ops' dispatch table gives it:
cuDNN on a GPU where it runs) with the same query/key/value/output
projections and the same RoPE, so the two models differ only by NSA's own
parameters (per-branch keys and values, the compression MLPs and the gates).

Packed rows (docs/semantics.md#packed-rows): `Transformer(tokens, segment_ids)` runs every
document of a row as a sequence of its own. Parameters are float32, `dtype` is the compute
dtype, logits are float32 (docs/api.md#the-model).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.module import NativeSparseAttention
from nsa_jax.ops import segments
from nsa_jax.ops.dense import dense_attention
from nsa_jax.rope import apply_rope

ATTENTIONS = ("nsa", "full")
# What a rematerialised block keeps for the backward pass besides its input (docs/memory.md).
REMAT_POLICIES = {"layer": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMATS = ("none", "keep", *REMAT_POLICIES)
EMBED_INIT = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the language model, and how its blocks run (memory options: docs/memory.md).

  Attributes:
    vocab_size: tokens (256 for bytes).
    d_model: model width.
    num_layers: transformer blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA; num_heads % num_kv_heads == 0).
    head_dim: per-head width (None: d_model // num_heads).
    mlp_hidden: SwiGLU hidden width (None: 8/3 d_model rounded up to a multiple of 64).
    attention: "nsa" or "full".
    nsa: NSA block sizes (used when attention == "nsa").
    shared_kv: NSA branches share one K/V projection (paper: separate).
    tie_embeddings: the output layer reuses the input embedding.
    rope_theta: RoPE base.
    dtype: compute dtype name ("float32", "bfloat16"); parameters stay float32.
    impl: NSA op implementation ("auto", "xla", "pallas").
    remat: recompute each block in the backward pass (docs/memory.md): "none"; "keep" also
      keeps what the NSA layer would recompute from its input (its projections, keys,
      values, gates and window and compressed branches: more memory, less time); "layer" keeps
      only the block's input; "dots" keeps its input and the outputs of its weight matmuls
      (jax.checkpoint_policies.dots_with_no_batch_dims_saveable: projections and MLP).
    scan_layers: the blocks' parameters stacked on a leading layer axis, run by one
      jax.lax.scan: one block compiled instead of num_layers (docs/memory.md).
    select_distill: weight of the selection distillation loss (docs/selection_learning.md,
      "Training"): each NSA layer's KL from its group's dense attention to its selection
      scores, mean over layers, added to the training loss; 0: not computed. Ignored by full
      attention, which selects nothing.
    select_distill_stride: that loss over every k-th chunk of 128 queries only (1: every
      query); the teacher's cost falls k-fold.
  """
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int | None = None
  mlp_hidden: int | None = None
  attention: str = "nsa"
  nsa: NSAConfig = NSAConfig()
  shared_kv: bool = False
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  dtype: str = "float32"
  impl: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  select_distill: float = 0.0
  select_distill_stride: int = 1

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention={self.attention!r} must be one of {ATTENTIONS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} must be a multiple of "
                       f"num_heads={self.num_heads}, or set head_dim")
    if self.head_size % 2:
      raise ValueError(f"head dim {self.head_size} must be even for RoPE")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype={self.dtype!r} must be float32, bfloat16 or float16")
    if self.remat not in REMATS:
      raise ValueError(f"remat={self.remat!r} must be one of {REMATS}")
    if not self.select_distill >= 0:
      raise ValueError(f"select_distill={self.select_distill} must be >= 0 (0: no "
                       f"selection distillation)")
    if not isinstance(self.select_distill_stride, int) or self.select_distill_stride < 1:
      raise ValueError(f"select_distill_stride={self.select_distill_stride!r} must be an int "
                       f">= 1 (1: every query)")

  @property
  def distills(self) -> bool:
    """Whether training adds the selection distillation loss (NSA, select_distill > 0)."""
    return self.attention == "nsa" and self.select_distill > 0

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def mlp_size(self) -> int:
    return self.mlp_hidden or -(-8 * self.d_model // 3 // 64) * 64

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def check_seq_len(self, seq_len: int) -> None:
    """Raises a ValueError when NSA cannot work at `seq_len` tokens.

    NSA needs at least one compressed block (`seq_len >= compress_block`) and
    room for more selection blocks than are forced (`num_initial + num_local`),
    otherwise the selection branch would be the window branch under another name.
    """
    if self.attention != "nsa":
      return
    c = self.nsa
    if seq_len < c.compress_block:
      raise ValueError(f"seq_len={seq_len} is shorter than one compressed block "
                       f"(compress_block={c.compress_block}): NSA's compressed and "
                       f"selection branches would see nothing")
    forced = c.num_initial + c.num_local
    if c.num_select_blocks(seq_len) <= forced:
      raise ValueError(f"seq_len={seq_len} holds only {c.num_select_blocks(seq_len)} "
                       f"selection blocks of select_block={c.select_block}, not more than "
                       f"the {forced} always selected (num_initial + num_local): "
                       f"use a longer seq_len or smaller blocks")


class FullAttention(nnx.Module):
  """Dense causal GQA self-attention with RoPE: the baseline NSA is compared with.

  `mesh` (set by `nsa_jax.sharding.shard_model_and_optimizer`): XLA partitions the layer over
  data, fsdp and heads. It refuses a mesh with context > 1 (`check_mesh`).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, head_dim: int,
               rope_theta: float, dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.mesh = None
    kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.q_proj = nnx.Linear(d_model, num_heads * head_dim, **kw)
    self.kv_proj = nnx.Linear(d_model, 2 * num_kv_heads * head_dim, **kw)
    self.o_proj = nnx.Linear(num_heads * head_dim, d_model, **kw)

  def qkv(self, x, positions):
    """q [B, T, H, D], k, v [B, T, HKV, D] of x at `positions` (RoPE on q and k)."""
    B, T, _ = x.shape
    H, HKV, D = self.num_heads, self.num_kv_heads, self.head_dim
    q = apply_rope(self.q_proj(x).reshape(B, T, H, D), positions, self.rope_theta)
    kv = self.kv_proj(x).reshape(B, T, HKV, 2, D)   # head-major: splits by head on a mesh
    return q, apply_rope(kv[:, :, :, 0], positions, self.rope_theta), kv[:, :, :, 1]

  def check_mesh(self) -> None:
    """A ValueError for a mesh that splits sequences (context > 1): a shard's queries would
    attend to all keys before them from a query offset, which cuDNN's fused attention does
    not take (its causal mask starts at the first query) and which XLA's attention would
    run with [T / context, T] scores per head in memory."""
    chunks = 1 if self.mesh is None else self.mesh.shape["context"]
    if chunks > 1:
      raise ValueError(f"attention='full' does not run on a mesh with context={chunks}: "
                       f"cuDNN's causal attention takes no query offset and XLA's would hold "
                       f"[T/{chunks}, T] scores per head; train full attention with data, "
                       f"fsdp or heads, or NSA with context")

  def __call__(self, x, segment_ids=None):
    """Over x [B, T, d_model]; segment_ids [B, T] (packed rows): each document alone,
    positions restarting at 0 at its start."""
    B, T, _ = x.shape
    self.check_mesh()
    positions = (jnp.arange(T) if segment_ids is None
                 else segments.positions_in_documents(segment_ids))
    q, k, v = self.qkv(x, positions)
    o = dense_attention(q, k, v, segment_ids=segment_ids)
    return self.o_proj(o.reshape(B, T, -1))


class SwiGLU(nnx.Module):
  """MLP with a SiLU-gated hidden layer (Shazeer 2020)."""

  def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.gate_up = nnx.Linear(d_model, 2 * hidden, **kw)
    self.down = nnx.Linear(hidden, d_model, **kw)

  def __call__(self, x):
    gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
    return self.down(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c, dtype = config, config.compute_dtype
    self.attn_norm = nnx.RMSNorm(c.d_model, dtype=dtype, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(c.d_model, dtype=dtype, rngs=rngs)
    if c.attention == "nsa":
      self.attn = NativeSparseAttention(
          c.d_model, c.num_heads, c.num_kv_heads, head_dim=c.head_size, config=c.nsa,
          shared_kv=c.shared_kv, rope_theta=c.rope_theta, impl=c.impl, dtype=dtype,
          param_dtype=jnp.float32, recompute=c.remat != "keep", rngs=rngs)
    else:
      self.attn = FullAttention(c.d_model, c.num_heads, c.num_kv_heads,
                                head_dim=c.head_size, rope_theta=c.rope_theta,
                                dtype=dtype, rngs=rngs)
    self.mlp = SwiGLU(c.d_model, c.mlp_size, dtype=dtype, rngs=rngs)
    self.distill_stride = c.select_distill_stride

  def __call__(self, x, attend=None, segment_ids=None, distill=False):
    """Pre-norm residual block; `attend(attn, h) -> y` replaces `attn(h)` (decoding).
    distill: return (output, the NSA layer's selection distillation loss)."""
    h = self.attn_norm(x)
    if distill:
      y, loss = self.attn(h, segment_ids, distill=True, distill_stride=self.distill_stride)
    else:
      y = self.attn(h, segment_ids) if attend is None else attend(self.attn, h)
    x = x + y
    x = x + self.mlp(self.mlp_norm(x))
    return (x, loss) if distill else x


class Transformer(nnx.Module):
  """tokens [B, T] int -> next-token logits [B, T, vocab] float32.

  `blocks` is an `nnx.List` of `Block`s, or with `config.scan_layers` one `Block` whose
  parameters have a leading layer axis (`stack_layers`; the same values as the list's
  for the same seed). `layer(i)` is block i either way.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.compute_dtype
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                           embedding_init=EMBED_INIT, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    if config.scan_layers:   # the same values, stacked
      self.blocks = nnx.merge(nnx.graphdef(self.blocks[0]),
                              stack_layers(nnx.state(self))["blocks"])
    self.norm = nnx.RMSNorm(config.d_model, dtype=dtype, rngs=rngs)
    self.lm_head = None if config.tie_embeddings else nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, dtype=dtype,
        kernel_init=EMBED_INIT, rngs=rngs)

  def layer(self, i: int) -> Block:
    """Block i. With scan_layers: a Block over layer i's slice of the stacked parameters,
    for reading (assigning to its parameters does not change the model)."""
    if not self.config.scan_layers:
      return self.blocks[i]
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

  def run_blocks(self, x, segment_ids=None, distill=False):
    """The blocks over x [B, T, d_model]: a loop over one jitted block (traced and lowered
    once for every layer, docs/memory.md) or a `jax.lax.scan` (scan_layers), each block
    under `jax.checkpoint` with `REMAT_POLICIES[remat]` for remat "layer" and "dots".
    Returns (output, each layer's selection distillation loss [L] with `distill`, else None)."""
    c = self.config

    def run(graphdef, state, x, segment_ids):
      out = nnx.merge(graphdef, state)(x, segment_ids=segment_ids, distill=distill)
      return out if distill else (out, None)

    if c.remat in REMAT_POLICIES:   # prevent_cse=False is safe, and faster, under a scan
      run = jax.checkpoint(run, static_argnums=0, policy=REMAT_POLICIES[c.remat],
                           prevent_cse=not c.scan_layers)
    if c.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      return jax.lax.scan(lambda x, layer: run(graphdef, layer, x, segment_ids), x, state)
    run = jax.jit(run, static_argnums=0)
    losses = []
    for block in self.blocks:
      x, loss = run(*nnx.split(block), x, segment_ids)
      losses.append(loss)
    return x, jnp.stack(losses) if distill else None

  def __call__(self, tokens, segment_ids=None, attend=None, distill=False):
    """Logits of tokens [B, T], or with `distill` (config.distills) (logits, the selection
    distillation loss: the mean over layers of each NSA layer's, float32).

    segment_ids: [B, T] int, documents packed in a row (docs/semantics.md#packed-rows: runs,
      each starting at a multiple of the NSA config's select_block, as
      `nsa_jax.data` packs them): each runs as a sequence of its own. None: one
      document per row.
    attend: `attend(i, attn, h) -> y`, if given, replaces block i's attention call
      (nsa_jax.decoding threads its KV caches through it; one document per row). The
      blocks then run one by one (`layer(i)`), without remat or scan.
    """
    if attend is not None and segment_ids is not None:
      raise ValueError("segment_ids with attend: decoding (nsa_jax.decoding) runs one "
                       "document per row; pass segment_ids=None")
    if distill and (attend is not None or not self.config.distills):
      raise ValueError(f"distill=True needs an NSA model with select_distill > 0 (got "
                       f"attention={self.config.attention!r}, select_distill="
                       f"{self.config.select_distill}) and no attend")
    x = self.embed(tokens)
    if attend is None:
      x, losses = self.run_blocks(x, segment_ids, distill)
    else:
      for i in range(self.config.num_layers):
        x = self.layer(i)(x, functools.partial(attend, i))
    x = self.norm(x)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    logits = logits.astype(jnp.float32)
    return (logits, jnp.mean(losses.astype(jnp.float32))) if distill else logits


def _layer_axis(path) -> int | None:
  """Where "blocks" is in a state path (a Transformer's, or an optimizer's over one)."""
  return path.index("blocks") if "blocks" in path else None


def stack_layers(state: nnx.State) -> nnx.State:
  """A state of per-layer blocks (paths `.. blocks/i/..`: a Transformer's, or an optimizer's
  over one) in the scan_layers layout (`.. blocks/..`, layer i at index i of a leading axis)."""
  flat, layers = [], {}
  for path, v in nnx.to_flat_state(state):
    j = _layer_axis(path)
    if j is None:
      flat.append((path, v))
    else:
      layers.setdefault(path[:j + 1] + path[j + 2:], {})[path[j + 1]] = v
  for path, vs in layers.items():
    flat.append((path, vs[0].replace(jnp.stack([vs[i].get_value() for i in range(len(vs))]))))
  return nnx.from_flat_state(flat)


def unstack_layers(state: nnx.State) -> nnx.State:
  """The inverse of `stack_layers`: the scan_layers layout -> per-layer blocks."""
  flat = []
  for path, v in nnx.to_flat_state(state):
    j = _layer_axis(path)
    if j is None:
      flat.append((path, v))
    else:
      x = v.get_value()
      flat += [(path[:j + 1] + (i,) + path[j + 1:], v.replace(x[i])) for i in range(x.shape[0])]
  return nnx.from_flat_state(flat)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
