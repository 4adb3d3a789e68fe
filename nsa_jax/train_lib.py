"""Training a byte-level LM with NSA or full attention: steps, checkpoints, the loop.

`experiments/train.py` is the command line around :func:`main`; the configuration is
`nsa_jax.train_config`. :func:`train` builds the model, optimizes it with AdamW (warmup,
cosine decay, clipping) on batches of `nsa_jax.data.Loader`, compiles the train and eval
steps first (a later start reads them from the persistent cache, `compile_cache`), stops
with :class:`NonFiniteError` before saving a non-finite step, checkpoints with Orbax and
resumes bit for bit (finding no checkpoint it says where it looked and trains from
scratch), and writes `config.json`, `metrics.csv`, TensorBoard events and
`loss.png` under `out` (process 0 only on several hosts). docs/api.md#training.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from nsa_jax import data, sampling, sharding
from nsa_jax.compile_cache import compile_cache
from nsa_jax.checkpoints import (checkpoint_manager, load_model, restore_checkpoint,
                                 save_checkpoint)
from nsa_jax.model import Transformer, count_params
from nsa_jax.train_config import TrainConfig, parse_args, to_dict


# ----------------------------------------------------------------------------
# Optimizer and steps.


def _schedule(lr: float, min_lr_ratio: float, warmup_steps: int, steps: int):
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=steps,
      end_value=lr * min_lr_ratio)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  return _schedule(cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, cfg.steps)


@functools.lru_cache(maxsize=8)
def _adamw(lr: float, min_lr_ratio: float, warmup_steps: int, steps: int,
           weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
  """AdamW (no weight decay on vectors: norms, biases) after global-norm clipping.

  Cached by its hyperparameters, so that equal configurations give equal
  (hashable) graphdefs and share the compiled steps of `make_steps`.
  """
  schedule = _schedule(lr, min_lr_ratio, warmup_steps, steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> nnx.Optimizer:
  tx = _adamw(cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, cfg.steps, cfg.weight_decay,
              cfg.grad_clip)
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def loss_sums(model: Transformer, batch):
  """(sum of weighted next-token NLL, sum of weights, selection distillation loss) of a
  batch; its rows' documents (`segment_ids`, docs/semantics.md#packed-rows) each run as a sequence of their own.
  The distillation loss (mean over layers, `Transformer(distill=True)`) is None unless
  `model.config.distills`: then it is not computed at all."""
  segment_ids = batch.get("segment_ids")
  distill = None
  if model.config.distills:
    logits, distill = model(batch["inputs"], segment_ids=segment_ids, distill=True)
  else:
    logits = model(batch["inputs"], segment_ids=segment_ids)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w), distill


def distill_weight(select_distill: float, warmup_steps: int, step):
  """The distillation loss's weight at optimizer step `step` (0-based): rising linearly
  from select_distill / warmup_steps to select_distill over the first warmup_steps
  steps, then select_distill (docs/selection_learning.md, "Training")."""
  if warmup_steps == 0:
    return select_distill
  return select_distill * jnp.minimum(1.0, (step + 1) / warmup_steps)


@functools.lru_cache(maxsize=8)
def make_steps(graphdef, distill_warmup_steps: int = 0):
  """jit-compiled (train_step, eval_step) over the state of nnx.split((model, optimizer)).

  train_step(state, batch) -> (new state, metrics) *donates* `state`: its buffers
  hold the new state, so that the step's peak memory holds the parameters and the
  optimizer's moments once, not twice. The state passed in (and the model and
  optimizer it was split from) must not be read afterwards: thread the returned
  state, and `nnx.update` the modules with it before using them.
  Its loss is the mean weighted NLL ("loss" in the metrics), plus, for a model whose
  config distills, `distill_weight` times the selection distillation loss ("distill").
  Cached by graphdef (and the warmup), so runs of one configuration in one process (a
  resumed run, the tests) share the compiled steps.
  """

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    c = model.config

    def loss_fn(model):
      total, count, distill = loss_sums(model, batch)
      loss = total / jnp.maximum(count, 1.0)
      if distill is None:
        return loss, {"loss": loss}
      weight = distill_weight(c.select_distill, distill_warmup_steps, optimizer.step[...])
      return loss + weight * distill, {"loss": loss, "distill": distill}

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {**metrics, "grad_norm": optax.tree.norm(grads)}

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return loss_sums(model, batch)[:2]

  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


class NonFiniteError(RuntimeError):
  """A NaN or Inf loss or gradient: the run stopped, the last checkpoint is the last good state."""


# ----------------------------------------------------------------------------
# Output: config, CSV, TensorBoard, PNG, messages.


def is_process_0() -> bool:
  """Whether this process writes the run's files and prints: the only process, or
  process 0 of a multi-host run. (Checkpoints are every process's business.)"""
  return jax.process_index() == 0


class MetricsLog:
  """A run's output under `out_dir`: config.json, then rows of metrics per step ->
  metrics.csv, TensorBoard events and loss.png; and its messages on stdout.
  Without tensorboardX (the GPU image has none) there are no events, and a
  message says so.

  Only process 0 writes or prints: on the other processes of a multi-host run
  every method does nothing. On resume, rows after the restored step (written
  before a crash) are dropped.
  """

  def __init__(self, out_dir: pathlib.Path, columns: list[str], resume_step: int,
               config: dict):
    self.enabled = is_process_0()
    if not self.enabled:
      return
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    self.out_dir, self.columns = out_dir, columns
    self.csv_path, self.png_path = out_dir / "metrics.csv", out_dir / "loss.png"
    self.rows = []
    if resume_step and self.csv_path.exists():
      with open(self.csv_path) as f:
        self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    with open(self.csv_path, "w", newline="") as f:
      writer = csv.DictWriter(f, columns, restval="")
      writer.writeheader()
      writer.writerows(self.rows)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1)
    except ImportError:
      self.tb = None
      self.say("tensorboardX is not installed: no TensorBoard events "
               "(metrics.csv and loss.png are written)")

  def say(self, text: str) -> None:
    if self.enabled:
      tqdm.write(text)   # above a progress bar, if one is running

  def log(self, row: dict) -> None:
    if not self.enabled:
      return
    self.rows.append(row)
    with open(self.csv_path, "a", newline="") as f:
      csv.DictWriter(f, self.columns, restval="").writerow(row)
    for key, value in row.items():
      if key != "step" and self.tb is not None:
        self.tb.add_scalar(key, value, row["step"])

  def plot(self) -> pathlib.Path | None:
    if not self.enabled:
      return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in [c for c in self.columns if c == "loss" or c.startswith("val_")]:
      pts = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key, "") != ""]
      if pts:
        ax.plot(*zip(*pts), marker="o" if key != "loss" else None, ms=3,
                label="train" if key == "loss" else key, lw=1 if key == "loss" else 1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(self.png_path, dpi=120)
    plt.close(fig)
    return self.png_path

  def close(self) -> None:
    if self.enabled and self.tb is not None:
      self.tb.close()


# ----------------------------------------------------------------------------
# Sampling and the end-of-run message.


def sample(model: Transformer, prompt: bytes, num_tokens: int, *, seed: int = 0,
           temperature: float = 0.8) -> bytes:
  """`prompt` continued by `num_tokens` bytes through `nsa_jax.sampling.generate` (prefill, then
  one decode step a token over the KV cache; the decode kernels on a GPU)."""
  tokens = list(prompt) or [ord("\n")]
  new = sampling.generate(model, jnp.asarray([tokens], jnp.int32), jax.random.key(seed),
                          max_new_tokens=num_tokens,
                          sampling=sampling.Sampling(temperature=temperature))
  return bytes(tokens + np.asarray(new[0]).tolist())


def _python() -> str:
  """How to call this interpreter from the working directory (e.g. .venv/bin/python)."""
  exe = pathlib.Path(sys.executable)
  return str(exe.relative_to(pathlib.Path.cwd())) if exe.is_relative_to(pathlib.Path.cwd()) \
      else "python"


def sample_command(python: str, out: pathlib.Path, prompt: str, num_tokens: int) -> str:
  """A shell command that prints a sample of the run in `out` (as `main` does)."""
  code = (f"from nsa_jax.train_lib import load_model, sample; "
          f"model, _, _ = load_model({json.dumps(str(out))}); "
          f"print(sample(model, {json.dumps(prompt)}.encode(), {num_tokens})"
          f".decode(errors=\"replace\"))")
  return f"{python} -c {shlex.quote(code)}"


def end_message(cfg: TrainConfig, step: int, argv: list[str]) -> str:
  """Where the run's files are and what to run next: resume, evaluate, sample, TensorBoard."""
  out, python = cfg.out_dir, _python()
  again = f"{python} -m experiments.train {shlex.join(argv)}".rstrip()
  lines = [f"--- run directory {out}/",
           f"  checkpoints/  Orbax checkpoints, latest step {step}; the same command resumes "
           f"from the latest:",
           f"                  {again}",
           "                add --steps N to train on to step N (a finished run only samples)"]
  if (out / "tb").exists():
    view = f"{python} -m tensorboard.main --logdir {out / 'tb'}"
    if importlib.util.find_spec("tensorboard") is None:
      view = f"{python} -m pip install tensorboard, then {view}"
    lines.append(f"  tb/           TensorBoard events: {view}")
  lines += ["  loss.png, metrics.csv (per step), config.json",
            f"evaluate passkey retrieval: {python} -m experiments.eval_retrieval --run {out}",
            "sample again: the command above with --sample_prompt TEXT --sample_tokens N, or",
            "  " + sample_command(python, out, cfg.sample_prompt, cfg.sample_tokens)]
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# The loop.


def evaluate(eval_step, state, val_sets: dict[str, list]) -> dict[str, float]:
  out = {}
  for task, batches in val_sets.items():
    sums = [eval_step(state, b) for b in batches]
    out[f"val_{task}"] = float(sum(s[0] for s in sums) / max(sum(s[1] for s in sums), 1.0))
  return out


def train(cfg: TrainConfig, *, crash_after_step: int | None = None) -> list[dict]:
  """Runs (or resumes) training, with its `compile_cache`; returns the metric rows of this call.

  `crash_after_step` stops right after that step without saving or evaluating,
  like a killed process (used by the resume test).
  Raises NonFiniteError on a NaN/Inf loss or gradient norm.
  """
  mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None   # may refuse: before any file
  with compile_cache(cfg):
    return _train(cfg, crash_after_step, mesh)


def _train(cfg: TrainConfig, crash_after_step: int | None, mesh) -> list[dict]:
  out = cfg.out_dir
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  optimizer = make_optimizer(model, cfg)
  place = (lambda b: sharding.shard_batch(b, mesh)) if mesh is not None else (lambda b: b)
  if mesh is not None:   # before the restore, which then targets these shardings
    sharding.shard_model_and_optimizer(model, optimizer, mesh)
  loader = data.Loader(cfg.mixture, **cfg.data_options())
  val_sets = {task: [place(b) for b in data.validation_batches(
                  task, num_batches=cfg.eval_batches, **cfg.data_options())]
              for task in loader.mixture}
  out.mkdir(parents=True, exist_ok=True)
  manager = checkpoint_manager(out, cfg.keep_checkpoints)
  start, train_s = 0, 0.0
  if cfg.resume and manager.latest_step() is not None:
    meta = restore_checkpoint(manager, manager.latest_step(), model, optimizer, loader)
    start, train_s = meta["step"], meta["train_s"]
  columns = ["step", "loss", *(["distill"] if cfg.model.distills else []), "grad_norm", "lr",
             "step_s", "tokens_per_s", "train_s", "compile_s",
             *[f"val_{t}" for t in loader.mixture]]
  log = MetricsLog(out, columns, start, to_dict(cfg))
  if start:
    log.say(f"resumed from step {start} of {manager.directory}")
  elif cfg.resume:   # a first run, or a mistyped --out: say where we looked
    log.say(f"no checkpoint in {manager.directory}: training from scratch")
  if start >= cfg.steps:
    log.say(f"step {start} of {cfg.steps} reached already: nothing to train")
    manager.close()
    log.close()
    return []
  log.say(f"{cfg.model.attention} model: {count_params(model):,} parameters; "
          f"{cfg.batch_size} x {cfg.seq_len} tokens per step; output in {out}")

  graphdef, state = nnx.split((model, optimizer))
  log.say("compiling the train and eval steps...")
  t0 = time.perf_counter()
  example = next(iter(val_sets.values()))[0]    # shaped and placed like a training batch
  train_step, eval_step = (f.lower(state, example).compile()
                           for f in make_steps(graphdef, cfg.distill_warmup_steps))
  compile_s = time.perf_counter() - t0
  log.say(f"compiled in {compile_s:.1f} s")
  schedule = lr_schedule(cfg)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  rows = []
  bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and log.enabled),
             unit="step", dynamic_ncols=True)
  for step in range(start + 1, cfg.steps + 1):
    batch = place(next(loader))
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    step_s = time.perf_counter() - t0
    train_s += step_s
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      manager.wait_until_finished()
      bar.close()
      raise NonFiniteError(
          f"step {step}: loss={loss}, grad_norm={grad_norm} is not finite; stopped. "
          f"Last good checkpoint: step {manager.latest_step()} in {manager.directory} "
          f"(lower --lr or raise --warmup_steps, then resume from it)")
    row = {"step": step, "loss": loss, "grad_norm": grad_norm,
           **({"distill": float(metrics["distill"])} if "distill" in metrics else {}),
           "lr": float(schedule(step - 1)), "step_s": step_s,
           "tokens_per_s": tokens_per_step / step_s, "train_s": train_s}
    if step == start + 1:
      row["compile_s"] = compile_s
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                    step_ms=f"{1e3 * step_s:.0f}")
    if step == crash_after_step:
      log.log(row)
      rows.append(row)
      break
    last = step == cfg.steps or (cfg.time_limit_s > 0 and train_s > cfg.time_limit_s)
    if step % cfg.eval_every == 0 or last:
      row.update(evaluate(eval_step, state, val_sets))
      log.say(f"step {step}: " + ", ".join(
          f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_")))
    log.log(row)
    rows.append(row)
    if step % cfg.ckpt_every == 0 or last:
      nnx.update((model, optimizer), state)
      save_checkpoint(manager, step, model, optimizer, loader, cfg, train_s)
    if step % cfg.eval_every == 0 or last:
      log.plot()
    if last:
      if step < cfg.steps:
        log.say(f"time limit {cfg.time_limit_s:.0f} s reached at step {step}")
      break
  bar.close()
  manager.wait_until_finished()
  manager.close()
  log.close()
  nnx.update((model, optimizer), state)
  return rows


def main(argv=None) -> None:
  sharding.setup_distributed()
  argv = sys.argv[1:] if argv is None else list(argv)
  cfg = parse_args(argv)
  with compile_cache(cfg):   # the sample's programs too
    try:
      train(cfg)
    except NonFiniteError as err:
      sys.exit(f"error: {err}")
    model, _, step = load_model(cfg.out_dir)   # on every process: Orbax syncs them
    if not is_process_0():
      return
    print(f"--- sample from the step-{step} checkpoint (nsa_jax.sampling.generate, "
          f"temperature 0.8) ---")
    text = sample(model, cfg.sample_prompt.encode(), cfg.sample_tokens, seed=cfg.seed)
  print(text.decode("utf-8", errors="replace"))
  print(end_message(cfg, step, argv))
