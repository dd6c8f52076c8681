#!/bin/sh
# benchmarks/gpu_check.py on the GPU machine, which has no .venv and no package registry:
# install the wheels `make gpu-wheels` put in gpu_wheels/ (carried along with the tree)
# into gpu_wheels/site, then run the check with that folder and the tree on the path.
# Arguments go to the check, e.g. `sh benchmarks/gpu_check.sh --checks eval`.
set -eu
cd "$(dirname "$0")/.."
python=${GPU_PYTHON:-python3}
if ! ls gpu_wheels/*.whl >/dev/null 2>&1; then
    echo "no wheels in gpu_wheels/: run 'make gpu-wheels' where a registry is reachable," >&2
    echo "then copy gpu_wheels/ (git-ignored) along with the tree" >&2
    exit 2
fi
rm -rf gpu_wheels/site
"$python" -m pip install --quiet --no-index --no-deps --target gpu_wheels/site gpu_wheels/*.whl
PYTHONPATH="$PWD:$PWD/gpu_wheels/site${PYTHONPATH:+:$PYTHONPATH}" exec "$python" benchmarks/gpu_check.py "$@"
