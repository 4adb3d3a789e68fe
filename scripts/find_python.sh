#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 (on PATH, then under pyenv), or explains what is missing.
set -u
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
# 3.12 first: the GPU image runs 3.12.
for name in python3.12 python3.13 python3 python; do
  p=$(command -v "$name" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for p in $(ls -d "$root"/versions/3.12*/bin/python3 "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null); do
    if ok "$p"; then echo "$p"; exit 0; fi
  done
fi
echo "error: nsa_jax needs Python >= 3.12 (jax 0.11.2 requires it)." >&2
echo "       None found on PATH (python3.13, python3.12, python3) or under pyenv." >&2
echo "       Install one (e.g. 'pyenv install 3.12') or put it on PATH, then rerun." >&2
exit 1
