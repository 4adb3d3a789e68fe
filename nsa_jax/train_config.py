"""A training run's configuration: one tree, its presets and its command-line flags.

    TrainConfig               data, optimization, evaluation, checkpoints, output
      .model: ModelConfig     the language model (nsa_jax.model)
        .nsa: NSAConfig       NSA's block sizes (nsa_jax.config; paper §3.3, §4.1)

Every leaf field is one flat command-line flag named after it (`--seq_len`,
`--d_model`, `--compress_block`, ...); `FLAG_NAMES` renames a leaf whose name
another leaf already has (none does today: building the flags fails loudly if
one ever does). A preset is a whole named `TrainConfig`, validated when this
module is imported; flags override fields of the chosen preset.

Each flag's one-line description is its field's entry in the "Attributes:"
section of its dataclass's docstring, so the documentation has one home.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import sys
import types
import typing

from nsa_jax import data
from nsa_jax.config import NSAConfig
from nsa_jax.model import ModelConfig

FieldPath = tuple[str, ...]   # a field's place in the tree, e.g. ("model", "nsa", "window")

# The demo's model: 2 layers, width 128, NSA blocks scaled down to T = 256.
DEMO_NSA = NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=4,
                     num_initial=1, num_local=2, window=64)
DEMO_MODEL = ModelConfig(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, nsa=DEMO_NSA)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run depends on; the defaults are the `demo` preset.

  Attributes:
    preset: the preset this configuration started from (names the default output directory).
    out: output directory; "" means runs/<preset>.
    model: the language model and its NSA block sizes (flags of their own below).
    mixture: training tasks and weights, e.g. "text:0.8,passkey:0.2" (nsa_jax.data).
    pack: rows of whole documents, each starting at a multiple of select_block, with segment ids
      (docs/semantics.md#packed-rows); false: one random window per row.
    pack_tasks: several passkey/mqar examples per packed row instead of one, each a document
      of its own (the model reads segment_ids).
    text_weight: loss weight of text tokens (the answer tokens of passkey/mqar weigh 1).
    seq_len: tokens per training sequence.
    batch_size: sequences per step.
    seed: seed of the parameters, the data order and the sample.
    val_percent: percent of the text files held out for validation.
    steps: total optimizer steps.
    lr: peak learning rate (AdamW).
    min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio.
    warmup_steps: steps of linear warmup from 0 to lr.
    distill_warmup_steps: steps over which the selection distillation weight (select_distill)
      rises linearly to its value (docs/selection_learning.md, "Training"); 0: none.
    weight_decay: AdamW weight decay (matrices only).
    grad_clip: global gradient-norm clip.
    eval_every: steps between validation losses.
    eval_batches: validation batches per task.
    ckpt_every: steps between checkpoints.
    keep_checkpoints: checkpoints kept (the latest ones).
    resume: continue from the latest checkpoint in out, if any.
    time_limit_s: > 0: stop (eval, checkpoint) after this much training time, compilation not
      counted.
    sample_tokens: bytes sampled from the final checkpoint.
    sample_prompt: prompt of that sample.
    progress: show a progress bar.
    mesh: device mesh, e.g. "data=2,heads=2" or "context=4" (sequences split over 4 devices;
      nsa_jax.sharding); "" runs on one device.
    compile_cache: directory of JAX's persistent compilation cache, which a later start of the
      same configuration reads instead of compiling: "auto" = <out>/jax_cache; "" = none set by
      the run (JAX's own settings apply, e.g. JAX_COMPILATION_CACHE_DIR).
  """
  preset: str = "demo"
  out: str = ""
  model: ModelConfig = DEMO_MODEL
  # data (nsa_jax.data)
  mixture: str = "text"
  pack: bool = True
  pack_tasks: bool = False
  text_weight: float = 1.0
  seq_len: int = 256
  batch_size: int = 4
  seed: int = 0
  val_percent: int = 5
  # optimization
  steps: int = 200
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 20
  distill_warmup_steps: int = 0
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  # evaluation, checkpoints, output
  eval_every: int = 50
  eval_batches: int = 2
  ckpt_every: int = 100
  keep_checkpoints: int = 3
  resume: bool = True
  time_limit_s: float = 0.0
  sample_tokens: int = 200
  sample_prompt: str = "def "
  progress: bool = True
  mesh: str = ""
  compile_cache: str = "auto"

  def __post_init__(self):
    if not isinstance(self.model, ModelConfig):
      raise ValueError(f"model={self.model!r} must be a ModelConfig")
    if self.model.vocab_size != data.VOCAB_SIZE:
      raise ValueError(f"vocab_size={self.model.vocab_size} must be {data.VOCAB_SIZE}: "
                       f"the data are bytes")
    for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches",
                 "ckpt_every", "keep_checkpoints", "sample_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
    if self.distill_warmup_steps < 0:
      raise ValueError(f"distill_warmup_steps={self.distill_warmup_steps} must be >= 0")
    data.parse_mixture(self.mixture, self.seq_len)
    if self.pack:
      data.check_alignment(self.model.nsa.select_block, self.seq_len)
    elif self.pack_tasks:
      raise ValueError("pack_tasks=True needs pack=True")
    if not self.text_weight > 0:
      raise ValueError(f"text_weight={self.text_weight} must be > 0")
    self.model.check_seq_len(self.seq_len)

  @property
  def out_dir(self) -> pathlib.Path:
    return pathlib.Path(self.out or f"runs/{self.preset}")

  @property
  def compile_cache_dir(self) -> pathlib.Path | None:
    if not self.compile_cache:
      return None
    return self.out_dir / "jax_cache" if self.compile_cache == "auto" else pathlib.Path(
        self.compile_cache)

  def data_options(self) -> dict:
    """Keyword arguments of `data.Loader` and `data.validation_batches` besides the task and split.
    Both attentions pack to select_block, so that NSA and full attention see the same rows."""
    return dict(seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed,
                val_percent=self.val_percent,
                align=self.model.nsa.select_block if self.pack else None,
                pack_tasks=self.pack_tasks, text_weight=self.text_weight)


# ----------------------------------------------------------------------------
# Presets: whole named configurations.


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named starting configuration, `--preset NAME`."""
  summary: str          # one line, listed by --help
  config: TrainConfig


def _gpu_model(**kw) -> ModelConfig:
  """bf16 compute, head_dim given, the paper's block sizes (NSAConfig's defaults)."""
  return ModelConfig(dtype="bfloat16", nsa=NSAConfig(), **kw)


PRESETS: dict[str, Preset] = {p.config.preset: p for p in (
    Preset("~3 minutes on a 2-core CPU: a 2-layer NSA model on byte-level stdlib text, T=256",
           TrainConfig()),
    Preset("the whole pipeline in seconds (tests, the scripts' --small modes)",
           TrainConfig(preset="tiny",
                       model=ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         nsa=DEMO_NSA),
                       mixture="text:0.6,passkey:0.2,mqar:0.2", seq_len=160, batch_size=2,
                       steps=8, warmup_steps=2, eval_every=4, eval_batches=1, ckpt_every=4,
                       sample_tokens=16)),
    Preset("one GPU, 8k context: 6 layers, width 384, text with passkey retrieval mixed in",
           TrainConfig(preset="gpu-small",
                       model=_gpu_model(d_model=384, num_layers=6, num_heads=8, num_kv_heads=2,
                                        head_dim=64),
                       mixture="text:0.8,passkey:0.2", seq_len=8192, batch_size=8, steps=1000,
                       lr=1e-3, warmup_steps=50, eval_every=100, eval_batches=4,
                       ckpt_every=250)),
    Preset("gpu-small shrunk (4 layers, width 256) so an NSA and a full run fit ~8 GPU minutes",
           TrainConfig(preset="gpu-compare",
                       model=_gpu_model(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2,
                                        head_dim=64),
                       mixture="text:0.75,passkey:0.25", seq_len=8192, batch_size=4, steps=400,
                       lr=2e-3, warmup_steps=40, eval_every=50, eval_batches=2, ckpt_every=400,
                       time_limit_s=120.0)),
    Preset("research-sized, 8k context: 12 layers, width 1024, 16 query heads of 128, G = 4; "
           "~165M parameters with full attention, ~216M with NSA (memory options: "
           "docs/memory.md)",
           TrainConfig(preset="research",
                       model=_gpu_model(d_model=1024, num_layers=12, num_heads=16,
                                        num_kv_heads=4, head_dim=128),
                       mixture="text:0.8,passkey:0.2", seq_len=8192, batch_size=8, steps=2000,
                       lr=6e-4, warmup_steps=200, eval_every=250, eval_batches=4,
                       ckpt_every=500)),
)}


# ----------------------------------------------------------------------------
# Flat names for the fields of the tree.

# A leaf whose name another leaf has gets its flag name here: {path: flag}.
FLAG_NAMES: dict[FieldPath, str] = {}
# Leaves that are not flags: the preset is chosen with --preset; the vocabulary is the data's.
NOT_FLAGS: frozenset[FieldPath] = frozenset({("preset",), ("model", "vocab_size")})


def leaf_paths(cls, prefix: FieldPath = ()) -> list[tuple[FieldPath, type, type]]:
  """[(path, type, owning dataclass)] of every non-dataclass field under `cls`, in order."""
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      out += leaf_paths(tp, prefix + (f.name,))
    else:
      out.append((prefix + (f.name,), tp, cls))
  return out


def flag_paths(cls, names: dict[FieldPath, str], skip=frozenset()) -> dict[str, FieldPath]:
  """{flag: path} of the leaves of `cls`, each named by its field unless `names` renames it.

  Raises ValueError when two leaves would get one flag name.
  """
  flags: dict[str, FieldPath] = {}
  for path, _, _ in leaf_paths(cls):
    if path in skip:
      continue
    flag = names.get(path, path[-1])
    if flag in flags:
      raise ValueError(f"flag --{flag} would set both {'.'.join(flags[flag])} and "
                       f"{'.'.join(path)}: give one of them a name in FLAG_NAMES")
    flags[flag] = path
  return flags


FLAGS: dict[str, FieldPath] = flag_paths(TrainConfig, FLAG_NAMES, NOT_FLAGS)


def get(cfg, path: FieldPath):
  for name in path:
    cfg = getattr(cfg, name)
  return cfg


def _replace(obj, changes: dict[FieldPath, object]):
  """`obj` with the fields at `changes`' paths replaced, each level rebuilt (and validated) once."""
  here = {p[0]: v for p, v in changes.items() if len(p) == 1}
  for name in {p[0] for p in changes if len(p) > 1}:
    inner = {p[1:]: v for p, v in changes.items() if len(p) > 1 and p[0] == name}
    here[name] = _replace(getattr(obj, name), inner)
  return dataclasses.replace(obj, **here)


def override(cfg: TrainConfig, **flat) -> TrainConfig:
  """`cfg` with fields replaced by their flat (flag) names, e.g. override(cfg, window=256, lr=1e-3).

  TrainConfig's own fields (`model=ModelConfig(...)` too) may be given by name.
  """
  own = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(flat) - FLAGS.keys() - own)
  if unknown:
    raise ValueError(f"unknown config field(s) {', '.join(f'{k}={flat[k]!r}' for k in unknown)}; "
                     f"the fields are: {', '.join(FLAGS)}")
  return _replace(cfg, {FLAGS.get(k, (k,)): v for k, v in flat.items()})


def make_config(preset: str = "demo", **overrides) -> TrainConfig:
  """The preset's configuration with fields overridden by flat name (see `override`)."""
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r} must be one of {sorted(PRESETS)}")
  return override(PRESETS[preset].config, **overrides)


def to_dict(cfg: TrainConfig) -> dict:
  """The nested dict stored in checkpoints and config.json."""
  return dataclasses.asdict(cfg)


def from_dict(d: dict, cls=TrainConfig):
  """Inverse of `to_dict`. Fields missing from `d` take their defaults (a checkpoint written
  before they existed); fields `cls` does not have raise a ValueError. Checkpoints written before
  the config was a tree (flat keys such as d_model at the top) do not load."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"{cls.__name__} has no field(s) {unknown}: a configuration from an older "
                     f"version (checkpoints written before the nested TrainConfig > ModelConfig "
                     f"> NSAConfig tree do not load; train again)")
  return cls(**{k: from_dict(v, hints[k]) if dataclasses.is_dataclass(hints[k]) else v
                for k, v in d.items()})


# ----------------------------------------------------------------------------
# The command line.


def field_docs(cls) -> dict[str, str]:
  """{field: description} from the "Attributes:" section of `cls`'s docstring (Google style:
  `name: text`, continuation lines indented further), each entry joined into one line."""
  doc = inspect.getdoc(cls) or ""
  docs, name = {}, None
  for line in doc.partition("Attributes:")[2].splitlines():
    if line and not line[0].isspace():
      break                                   # the next section
    entry = re.match(r"^  (\w+): (.*)$", line)
    if entry:
      name = entry.group(1)
      docs[name] = entry.group(2).strip()
    elif name and line.strip():
      docs[name] += " " + line.strip()
  return docs


def _parser_of(tp) -> typing.Callable[[str], object]:
  """str -> value of type `tp` (int, float, str, bool, or one of them | None)."""
  args = typing.get_args(tp)
  optional = type(None) in args
  base = next(a for a in args if a is not type(None)) if optional else tp

  def parse(text: str):
    if optional and text.lower() == "none":
      return None
    if base is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")
      return text.lower() in ("true", "1")
    try:
      return base(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not a{'n' if base is int else ''} {base.__name__}"
          + (" (or none)" if optional else "")) from None
  return parse


def _type_name(tp) -> str:
  if isinstance(tp, types.UnionType):
    return " | ".join("None" if a is type(None) else a.__name__ for a in typing.get_args(tp))
  return tp.__name__


GROUPS = {TrainConfig: "training (nsa_jax.train_config.TrainConfig)",
          ModelConfig: "model (nsa_jax.model.ModelConfig)",
          NSAConfig: "NSA block sizes (nsa_jax.config.NSAConfig; paper §3.3)"}


def build_parser(defaults: TrainConfig, preset_given: bool) -> argparse.ArgumentParser:
  """The flags of every leaf, grouped by dataclass, each with its description and its value
  in `defaults` (the chosen preset's)."""
  which = (f"Defaults shown are preset {defaults.preset!r}'s." if preset_given else
           "Defaults shown are TrainConfig's, which are preset 'demo''s; with --preset NAME "
           "(e.g. --preset gpu-small --help) they are that preset's.")
  epilog = "presets:\n" + "\n".join(f"  {name:12s} {p.summary}" for name, p in PRESETS.items())
  parser = argparse.ArgumentParser(
      prog="python -m experiments.train",
      usage="%(prog)s [--preset NAME] [--FLAG VALUE ...]   (--help lists the flags)",
      description=f"Train a byte-level language model with NSA or full attention. {which}",
      epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=list(PRESETS), default=None,
                      help="the configuration the other flags override (default: demo)")
  groups = {cls: parser.add_argument_group(title) for cls, title in GROUPS.items()}
  docs = {cls: field_docs(cls) for cls in GROUPS}
  by_path = {path: (tp, cls) for path, tp, cls in leaf_paths(TrainConfig)}
  for flag, path in FLAGS.items():
    tp, cls = by_path[path]
    default = get(defaults, path)
    text = docs[cls].get(path[-1], "")
    groups[cls].add_argument(
        f"--{flag}", dest=flag, default=argparse.SUPPRESS, type=_parser_of(tp),
        metavar=_type_name(tp).upper().replace(" ", ""),
        help=f"{text} (default: {default!r})".replace("%", "%%"))
  return parser


def parse_args(argv=None) -> TrainConfig:
  """`[--preset NAME] [--field value ...]` -> TrainConfig; --preset may come anywhere.

  A configuration the flags make invalid is a usage error (argparse's: one line, exit 2).
  --steps without --warmup_steps keeps the preset's warmup below the steps (`--steps 1`:
  no warmup)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--preset", default=None)
  chosen = pre.parse_known_args(argv)[0].preset
  defaults = PRESETS[chosen if chosen in PRESETS else "demo"].config
  parser = build_parser(defaults, chosen in PRESETS)
  args = vars(parser.parse_args(argv))
  if "steps" in args and "warmup_steps" not in args:
    args["warmup_steps"] = min(defaults.warmup_steps, max(args["steps"] - 1, 0))
  try:
    return make_config(args.pop("preset") or "demo", **args)
  except ValueError as err:
    parser.error(str(err))
