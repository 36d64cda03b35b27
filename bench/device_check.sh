#!/usr/bin/env bash
# Every GPU measurement of the project in one run, on one NVIDIA GPU (H100/H200, 16 cores), in
# under 8 minutes; writes bench/results/device-<date>.md. The rows of the README's Performance
# section that need a GPU come from that file.
#
#   bash bench/device_check.sh                  # on the GPU machine, from the repository root
#   bash bench/device_check.sh --dry-run        # anywhere: check every step's command, run none
#   bash bench/device_check.sh --skip caption   # leave out a step (repeatable)
#
# The GPU machine has torch but not openai-clip, MLflow or Optuna. They come from wheels in .whl/
# (ignored by git), built beforehand on a machine with the project's environment and carried
# with the checkout:
#
#   pip wheel --no-deps -w .whl openai-clip==1.0.1 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.12.2 \
#     mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 optuna==5.1.0 alembic==1.20.1 \
#     colorlog==6.12.0 sqlalchemy==2.1.9 mako==1.4.3 databricks-sdk==0.167.0 \
#     opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
#     opentelemetry-proto==1.45.2 cachetools==7.3.3 cloudpickle==3.1.3 gitpython==3.2.1 \
#     gitdb==4.0.12 smmap==5.0.3 sqlparse==0.6.1 graphene==3.4.3 graphql-core==3.2.14 \
#     graphql-relay==3.2.0 flask==3.1.3 flask-cors==6.0.5 werkzeug==3.1.9 itsdangerous==2.2.0 \
#     blinker==1.9.0 docker==7.2.0 gunicorn==26.2.0 huey==3.5.4 skops==0.16.0 prettytable==3.19.0 \
#     python-dotenv==1.2.4 webdataset==1.0.2 braceexpand==0.1.7 pytest==9.2.0 pluggy==1.7.0 \
#     iniconfig==2.3.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 \
#     anyio==4.16.0 google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 protobuf==7.36.2 \
#     importlib-metadata==9.1.0 zipp==4.1.2 click==8.5.1 pyyaml==6.0.4 tqdm==4.70.1 \
#     narwhals==2.29.0 joblib==1.6.0 threadpoolctl==3.8.0 annotated-doc==0.0.7 truststore==0.10.5
#
# (the project's pins, without dependencies: 36 MB; the compiled ones are for the Python and
# platform they were built on). Only wheels of distributions the machine lacks are installed,
# without their dependencies, so nothing it has is replaced; numpy, pandas, pyarrow, pillow,
# torchvision and torchcodec are expected there with torch.
#
# Each step has a time limit, and the whole run a budget (DEVICE_CHECK_BUDGET, seconds, default
# 450): steps come in order of importance, and one that the budget no longer allows is listed as
# not run. A failing step is recorded with its output; the others still run.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
DATE=$(date -u +%Y-%m-%d)
OUT=${DEVICE_CHECK_OUT:-bench/results/device-$DATE.md}
BUDGET=${DEVICE_CHECK_BUDGET:-450}
WORK=${DEVICE_CHECK_WORK:-/tmp/taxonclip-device-check}
SHARDS="$WORK/shards"
CAPTION_MODEL=${CAPTION_MODEL:-2b}  # a random model of InternVL2-2B's size: the speed target's case
TRAIN="bench/train_throughput.py --steps 8 --warmup 3"

DRY=0
SKIP=" "
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip) shift; SKIP="$SKIP${1:-} " ;;
    *) echo "usage: bash bench/device_check.sh [--dry-run] [--skip STEP]..." >&2; exit 2 ;;
  esac
  shift
done

# name | time limit (s) | command, in order of importance
STEPS=$(cat <<EOF
gpu-tests|120|$PY -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider
train-b32|120|$PY $TRAIN --model ViT-B/32 --batch 256 --compile --ddp
train-l14|150|$PY $TRAIN --model ViT-L/14@336px --batch 64 --compile --ddp --no-baseline
shards|90|$PY bench/synthetic_shards.py --out $SHARDS --per-species 48 --size 192 --workers 16
from-shards-workers|60|$PY $TRAIN --model ViT-B/32 --batch 256 --no-baseline --from-shards $SHARDS --workers 14 --decode workers
from-shards-device|60|$PY $TRAIN --model ViT-B/32 --batch 256 --no-baseline --from-shards $SHARDS --workers 14 --decode device
eval-knn|90|$PY bench/eval_knn.py --device cuda --repeat 3
caption|90|$PY bench/caption_throughput.py --model $CAPTION_MODEL --images 256 --batch 32 --max-new-tokens 32 --device cuda
train-b32-reduce-overhead|90|$PY $TRAIN --model ViT-B/32 --batch 256 --compile --compile-mode reduce-overhead --ddp --no-baseline
train-l14-reduce-overhead|120|$PY $TRAIN --model ViT-L/14@336px --batch 64 --compile --compile-mode reduce-overhead --ddp --no-baseline
train-b32-max-autotune|150|$PY $TRAIN --model ViT-B/32 --batch 256 --compile --compile-mode max-autotune --ddp --no-baseline
train-l14-max-autotune|150|$PY $TRAIN --model ViT-L/14@336px --batch 64 --compile --compile-mode max-autotune --ddp --no-baseline
EOF
)

selected() {
  printf '%s\n' "$STEPS" | while IFS='|' read -r name limit command; do
    case "$SKIP" in *" $name "*) continue ;; esac
    printf '%s|%s|%s\n' "$name" "$limit" "$command"
  done
}

if [ "$DRY" = 1 ]; then
  echo "dry run: checking the command of every step (nothing is run)"
  selected | cut -d'|' -f3 | "$PY" bench/check_commands.py
  exit $?
fi

install_wheels() {
  # the distributions of .whl/ that this machine lacks, without dependencies
  local wheel name missing=()
  for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || continue
    name=$(basename "$wheel" | cut -d- -f1)
    "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null \
      || missing+=("$wheel")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps "${missing[@]}"
  fi
  echo "installed ${#missing[@]} wheels: ${missing[*]:-none}"
  "$PY" -c "import clip, mlflow, optuna, taxonclip.train; print('imports: clip, mlflow, optuna, taxonclip.train ok')"
}

mkdir -p "$(dirname "$OUT")" "$WORK"
START=$(date +%s)
{
  echo "# Device check, $DATE"
  echo
  echo "Written by \`bash bench/device_check.sh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
  echo "$(nproc) cores; $("$PY" -c 'import torch, sys; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}")' 2>&1)"
  echo '```'
  echo
  echo "## install"
  echo
  echo '```'
  install_wheels 2>&1 | tail -20
  echo '```'
} > "$OUT"

selected | while IFS='|' read -r name limit command; do
  left=$(( BUDGET - ($(date +%s) - START) ))
  {
    echo
    echo "## $name"
    echo
    echo "\`$command\`"
    echo
  } >> "$OUT"
  if [ "$left" -lt 20 ]; then
    echo "not run: the budget of $BUDGET s was spent" >> "$OUT"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[$(date -u +%H:%M:%S)] $name (at most $limit s)"
  begin=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$command" > "$WORK/$name.log" 2>&1 < /dev/null
  status=$?
  seconds=$(( $(date +%s) - begin ))
  case $status in
    0) verdict="exit 0" ;;
    124|137) verdict="stopped at its limit of $limit s" ;;
    *) verdict="FAILED, exit $status" ;;
  esac
  {
    echo "$verdict, $seconds s"
    echo
    echo '```'
    tail -c 6000 "$WORK/$name.log"
    echo '```'
  } >> "$OUT"
done

echo
echo "wrote $OUT in $(( $(date +%s) - START )) s"
