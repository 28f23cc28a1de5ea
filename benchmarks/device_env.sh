# Sourced by the device_round*.sh scripts: the packages the device image lacks (carried as wheels in
# .whl, see the device tool's README) and this checkout installed without touching the network.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
CFG=benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json
