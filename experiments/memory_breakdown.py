"""Where one attention layer's training memory goes (issue #31): the residuals it saves for
the backward, by source, NSA's layer against full attention's. Backends (--backend): xla,
pallas, gpu (cuDNN where `nsa(impl="pallas")` runs it; a stand-in off a GPU). Method:
docs/memory.md#where-one-layers-memory-goes.

    PYTHONPATH=. python -m experiments.memory_breakdown --small     # CPU, tiny shapes, seconds
    PYTHONPATH=. python -m experiments.memory_breakdown --backend pallas   # research shape, traced
    python -m experiments.memory_breakdown --backend gpu    # on a GPU: + compiled memory

Writes memory_breakdown_<backend>_<device>.json to --out (default $OUT, else
experiments/results).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import linecache
import os

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import bench_common as bc
from nsa_jax import NSAConfig
from nsa_jax.model import FullAttention
from nsa_jax.module import NativeSparseAttention
from nsa_jax.ops import cudnn

# The research preset's layer (nsa_jax.train_config: "research") and 65,536 tokens a step.
RESEARCH = dict(d_model=1024, num_heads=16, num_kv_heads=4, head_dim=128, T=8192, B=8,
                config=NSAConfig())
SMALL = dict(d_model=64, num_heads=4, num_kv_heads=1, head_dim=16, T=256, B=2,
             config=bc.small_config())

# (file suffix, function name or None, the line's text or None) -> source; the innermost
# frame of the repository's code that matches names a residual's source.
SOURCES = (
    ("nsa_jax/ops/selected.py", None, None, "selected branch"),
    ("pallas_kernels/selected_attention/wrapper.py", None, None, "selected branch"),
    ("nsa_jax/ops/window.py", None, None, "window branch"),
    ("pallas_kernels/window_attention.py", None, None, "window branch"),
    ("nsa_jax/ops/compressed.py", None, None, "compressed branch"),
    ("pallas_kernels/compressed_attention.py", None, None, "compressed branch"),
    ("nsa_jax/ops/selection.py", None, None, "selection"),
    ("nsa_jax/ops/nsa.py", "mix", None, "gate mix"),
    ("nsa_jax/rope.py", None, None, "RoPE"),
    ("nsa_jax/module.py", "CompressionMLP.__call__", None, "compression MLPs"),
    ("nsa_jax/module.py", "compression_blocks", None, "compression MLPs"),
    ("nsa_jax/module.py", "NativeSparseAttention.compress", None, "compression MLPs"),
    ("nsa_jax/module.py", "NativeSparseAttention.branch_kv", None, "k/v projections"),
    ("nsa_jax/module.py", None, "gate", "gates"),
    ("nsa_jax/module.py", None, "q_proj", "q projection"),
    ("nsa_jax/module.py", None, "o_proj", "output projection"),
    ("nsa_jax/ops/dense.py", None, None, "attention"),
    ("nsa_jax/model.py", None, "q_proj", "q projection"),
    ("nsa_jax/model.py", None, "kv", "k/v projections"),
    ("nsa_jax/model.py", None, "o_proj", "output projection"),
)


def source_of(eqn) -> str:
  """The source (`SOURCES`) of an equation's outputs, from its traceback."""
  frames = eqn.source_info.traceback.frames if eqn.source_info.traceback else []
  for frame in frames:   # innermost first
    path = frame.file_name.replace(os.sep, "/")
    line = linecache.getline(frame.file_name, frame.line_num)
    for suffix, function, text, source in SOURCES:
      if (path.endswith(suffix) and (function is None or frame.function_name == function)
          and (text is None or text in line)):
        return source
  return "other: " + (f"{frames[0].function_name}" if frames else "?")


def same_buffer(eqn, i: int):
  """The input var that output i of an equation shares its buffer with in XLA, or None:
  through a checkpoint name, a reshape, a conversion to the same dtype, a pad or slice
  that changes nothing, or a jitted function (e.g. `jnp.pad`) that passes an input on."""
  name = eqn.primitive.name
  if name in ("jit", "pjit"):
    inner = eqn.params["jaxpr"].jaxpr
    v = origin(inner, inner.outvars[i])
    return next((x for x, u in zip(eqn.invars, inner.invars) if u is v), None)
  x = eqn.invars[0] if eqn.invars else None
  if x is None or isinstance(x, jax.extend.core.Literal) or len(eqn.outvars) != 1:
    return None
  out = eqn.outvars[0].aval
  if name in ("name", "reshape", "squeeze", "expand_dims", "copy", "copy_p"):
    return x if out.size == x.aval.size and out.dtype == x.aval.dtype else None
  if name in ("convert_element_type", "pad", "slice", "reduce_precision"):
    return x if out.shape == x.aval.shape and out.dtype == x.aval.dtype else None
  return None


@functools.lru_cache(maxsize=None)
def _producers(jaxpr) -> dict:
  return {u: (eqn, i) for eqn in jaxpr.eqns for i, u in enumerate(eqn.outvars)}


def origin(jaxpr, v):
  """The var whose buffer v is (`same_buffer`, followed back)."""
  source = _producers(jaxpr)
  while (not isinstance(v, jax.extend.core.Literal) and v in source
         and (x := same_buffer(*source[v])) is not None):
    v = x
  return v


def residuals(f, *args) -> list[tuple[jax.ShapeDtypeStruct, str]]:
  """The residuals `jax.vjp(f, *args)` keeps, each buffer once (`same_buffer` looked
  through): [(shape and dtype, source)]. An argument kept is "layer input" (x) or
  "parameters" (already resident)."""
  leaves, tree = jax.tree.flatten(args)
  g = lambda *leaves: f(*jax.tree.unflatten(tree, leaves))
  closed, shapes = jax.make_jaxpr(lambda *a: jax.vjp(g, *a), return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  num_res = len(jax.tree.leaves(shapes[1]))
  kept = {origin(jaxpr, v) for v in jaxpr.outvars[len(jaxpr.outvars) - num_res:]
          if not isinstance(v, jax.extend.core.Literal)}
  out = []
  for i, v in enumerate(jaxpr.invars):
    if v in kept:
      out.append((v.aval, "layer input" if i == len(leaves) - 1 else "parameters"))
  for v in jaxpr.constvars:
    if v in kept:
      out.append((v.aval, "constant"))
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      if v in kept:
        out.append((v.aval, source_of(eqn)))
  return out


def nbytes(aval) -> int:
  return int(aval.size) * jnp.dtype(aval.dtype).itemsize


def make_layer(attention: str, shape: dict, impl: str):
  kw = dict(dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  if attention == "nsa":
    return NativeSparseAttention(shape["d_model"], shape["num_heads"], shape["num_kv_heads"],
                                 head_dim=shape["head_dim"], config=shape["config"],
                                 impl=impl, param_dtype=jnp.float32, **kw)
  return FullAttention(shape["d_model"], shape["num_heads"], shape["num_kv_heads"],
                       head_dim=shape["head_dim"], rope_theta=10000.0, **kw)


def layer_fn(layer):
  """(f(params, x) -> y, params) of an nnx layer."""
  graphdef, params = nnx.split(layer)
  return (lambda params, x: nnx.merge(graphdef, params)(x)), params


def breakdown(attention: str, shape: dict, impl: str) -> dict:
  """Residual bytes by source: per token (the difference between batch sizes 1 and B)
  and per layer (what batch size 1 keeps that does not grow with it), and the list."""
  f, params = layer_fn(make_layer(attention, shape, impl))
  T, B = shape["T"], shape["B"]
  x = lambda b: jax.ShapeDtypeStruct((b, T, shape["d_model"]), jnp.bfloat16)
  one, many = residuals(f, params, x(1)), residuals(f, params, x(B))
  s1, sB = _sum_by_source(one), _sum_by_source(many)
  per_token = {src: (sB.get(src, 0) - s1.get(src, 0)) / ((B - 1) * T) for src in sB}
  per_layer = {src: s1[src] - per_token.get(src, 0) * T for src in s1}
  return {"per_token": per_token, "per_layer": per_layer,
          "residuals": [dict(shape=list(a.shape), dtype=str(a.dtype), source=src,
                             bytes=nbytes(a)) for a, src in many]}


def _sum_by_source(res) -> dict[str, int]:
  out: dict[str, int] = collections.defaultdict(int)
  for aval, src in res:
    if src != "parameters":
      out[src] += nbytes(aval)
  return dict(out)


# ---------------------------------------------------------------------------------------
# cuDNN off a GPU: a stand-in with the residuals of jax's cuDNN rule.

def _forward_abstract(q, k, v, *, scale, window):
  B, T, HQ, _ = q.shape
  return (jax.core.ShapedArray(q.shape[:3] + v.shape[-1:], q.dtype),
          jax.core.ShapedArray((B, HQ, T), jnp.float32))


# Only traced, never run.
_forward_p = jax.extend.core.Primitive("cudnn_standin_fwd")
_forward_p.multiple_results = True
_forward_p.def_abstract_eval(_forward_abstract)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _standin(q, k, v, scale, window):
  return _standin_fwd(q, k, v, scale, window)[0]


def _standin_fwd(q, k, v, scale, window):
  o, lse = _forward_p.bind(q, k, v, scale=scale, window=window)
  return (o, jnp.swapaxes(lse, 1, 2)), (q, k, v, o, lse)   # what jax's cuDNN rule keeps


def _standin_bwd(scale, window, res, g):
  q, k, v, _, _ = res
  return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)   # traced, never run


_standin.defvjp(_standin_fwd, _standin_bwd)


def _standin_attention(q, k, v, *, scale=None, is_causal, implementation=None,
                       local_window_size=None, return_residual=False):
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  o, lse = _standin(q, k, v, scale, local_window_size)
  return (o, lse) if return_residual else o


@contextlib.contextmanager
def cudnn_standin():
  """cuDNN's calls as if on a GPU: `cudnn.cudnn_runs` says yes to 16-bit inputs and
  `jax.nn.dot_product_attention` is the stand-in."""
  saved = cudnn.cudnn_runs, jax.nn.dot_product_attention
  cudnn.cudnn_runs = lambda q, v, interpret=None: jnp.dtype(q.dtype).itemsize == 2
  jax.nn.dot_product_attention = _standin_attention
  try:
    yield
  finally:
    cudnn.cudnn_runs, jax.nn.dot_product_attention = saved


# ---------------------------------------------------------------------------------------

def compiled_memory(attention: str, shape: dict, impl: str) -> dict:
  """XLA's memory_analysis of one layer's forward and backward at batch B (bytes)."""
  f, params = layer_fn(make_layer(attention, shape, impl))
  x = jax.ShapeDtypeStruct((shape["B"], shape["T"], shape["d_model"]), jnp.bfloat16)
  loss = lambda params, x: jnp.sum(f(params, x).astype(jnp.float32))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  m = compiled.memory_analysis()
  return {name: getattr(m, name + "_in_bytes") for name in
          ("argument_size", "output_size", "temp_size", "alias_size", "peak_memory")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, seconds)")
  parser.add_argument("--backend", choices=("xla", "pallas", "gpu"), default=None,
                      help="NSA's ops (module doc); default: all three off a GPU, gpu on one")
  parser.add_argument("--out", default=bc.default_out_dir())
  args = parser.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  shape = SMALL if args.small else RESEARCH
  backends = [args.backend] if args.backend else (["gpu"] if on_gpu else
                                                  ["xla", "pallas", "gpu"])
  for backend in backends:
    impl = "xla" if backend == "xla" else "pallas"
    standin = lambda name: (cudnn_standin() if not on_gpu and (backend == "gpu" or name == "full")
                            else contextlib.nullcontext())
    result = {}
    for name in ("nsa", "full"):
      with standin(name):
        result[name] = breakdown(name, shape, impl)
    if on_gpu and backend == "gpu":
      for name in ("nsa", "full"):
        result[name]["compiled"] = compiled_memory(name, shape, impl)
    report(backend, shape, result)
    shape_meta = {k: v for k, v in shape.items() if k != "config"}
    bc.write_json(os.path.join(args.out, f"memory_breakdown_{backend}_"
                               f"{bc.slug(bc.gpu_name())}{'_small' if args.small else ''}.json"),
                  {"backend": backend, "shape": shape_meta, "standin": not on_gpu, **result},
                  config=shape["config"])


def report(backend: str, shape: dict, result: dict) -> None:
  print(f"\n== {backend}: residual bytes per token of one layer (B={shape['B']}, "
        f"T={shape['T']}, d_model={shape['d_model']}, HQ={shape['num_heads']}, "
        f"HKV={shape['num_kv_heads']}, D={shape['head_dim']}, bf16)")
  sources = sorted({s for r in result.values() for s in r["per_token"]},
                   key=lambda s: -result["nsa"]["per_token"].get(s, 0))
  rows = [(s, result["nsa"]["per_token"].get(s), result["full"]["per_token"].get(s))
          for s in sources]
  rows.append(("total", *(sum(result[n]["per_token"].values()) for n in ("nsa", "full"))))
  bc.print_table(("source", "NSA B/token", "full B/token"), rows)
  for name in ("nsa", "full"):
    if "compiled" in result[name]:
      print(name, "compiled:", {k: f"{v / 2**30:.2f} GiB"
                                for k, v in result[name]["compiled"].items()})


if __name__ == "__main__":
  main()
