"""Train a byte-level language model whose attention is NSA (or full attention, to compare).

    python -m experiments.train --preset demo               # ~3 min on a laptop CPU
    python -m experiments.train --preset gpu-small --attention full
    python -m experiments.train --preset demo --steps 400   # every config field is a flag
    python -m experiments.train --preset research --help   # the flags, that preset's defaults

(With `.venv` activated: `. .venv/bin/activate`; or call `.venv/bin/python`.)
Runs resume from the latest checkpoint in --out (default runs/<preset>).
The configuration (one tree: TrainConfig > ModelConfig > NSAConfig, presets,
flags) lives in `nsa_jax.train_config`; the loop and checkpoints in
`nsa_jax.train_lib`; this file is the command line (also installed as the
`nsa-train` console script).
"""
from nsa_jax.train_lib import main

if __name__ == "__main__":
  main()
