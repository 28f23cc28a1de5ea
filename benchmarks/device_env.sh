# Sourced by benchmarks/gpu_run.sh on the GPU machine, which has no network: the Python packages its
# image lacks (carried as wheels in .whl/, when there are any) and this checkout installed as an
# editable package (--no-build-isolation: pip must not fetch setuptools for the build).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install of $(pwd) failed" >&2
CFG=benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
