#!/usr/bin/env bash
# Create the Triton environment that `midasheng up --encoder-backend triton`, the Triton tests and
# benchmarks/encoder_backends.py start tritonserver from.
#
#   bash deploy/triton/setup-env.sh [DIR]
#
# DIR defaults to $MIDASHENG_TRITON_ENV, else .venv-triton in the project (where the project looks
# for it). PYTHON picks the interpreter (default python3); it must be built with a shared
# libpython (pyenv's is), which the Python backend loads.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${1:-${MIDASHENG_TRITON_ENV:-$root/.venv-triton}}"
"${PYTHON:-python3}" -m venv "$dir"
"$dir/bin/pip" install -q -r "$root/deploy/triton/requirements.txt"
"$dir/bin/python" - "$dir" <<'PY'
import pathlib, sys, sysconfig
import numpy, pytriton, torch
bin_ = pathlib.Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
assert bin_.exists(), f"{bin_} is missing"
libdir = sysconfig.get_config_var("LIBDIR")
assert libdir and any(pathlib.Path(libdir).glob("libpython3*.so*")), f"no shared libpython in {libdir}"
print(f"Triton environment ready at {sys.argv[1]} (tritonserver {bin_}, numpy {numpy.__version__}, torch {torch.__version__})")
PY
