#!/usr/bin/env bash
# The GPU path in one command (issue 15): the gpu test tier, then the benchmark at model=small
# (768 x 12 x 12, L = 1024, GPT-2 vocabulary) in bf16 eager / torch.compile / without flash-attn,
# the lean-vs-full loss, the reference backbones and the ddpm / ddpm_cache / confidence sampling
# throughput at L = 1024. Budget: under 8 minutes on an H100/H200; needs no network.
#
#   scripts/gpu_check.sh                  # on a CUDA machine; figures in $OUT or ./gpu_check_out
#   scripts/gpu_check.sh --dry-run        # the same steps at toy sizes on CPU (seconds)
#   scripts/gpu_check.sh --fetch-wheels   # where pip has network: bring the wheels along
#
# Wheels. A bare CUDA image with torch, lightning, transformers and torchmetrics lacks Hydra.
# `--fetch-wheels` downloads hydra-core, omegaconf and antlr4-python3-runtime (pure Python) for
# CPython $WHEEL_PYTHON (default 3.12) into ./.whl (ignored by git: .gitignore) and,
# when FLASH_ATTN_WHEEL names a file or URL of a flash-attn wheel built for the card's torch and
# CUDA, that one too. Copy ./.whl along with the tree (the device tool: carry [".whl"]); this
# script installs whatever is in ./.whl with --no-index into /tmp/unmask_site before it starts.
# Without flash-attn the flash comparison is reported as absent and everything else runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z $PY ]]; then if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi; fi
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac

if [[ $MODE == fetch ]]; then
  mkdir -p .whl
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
    || "$PY" -m pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1 \
      antlr4-python3-runtime==4.9.3
  if [[ -n ${FLASH_ATTN_WHEEL:-} ]]; then
    if [[ -f $FLASH_ATTN_WHEEL ]]; then cp "$FLASH_ATTN_WHEEL" .whl/; else "$PY" -m pip download --no-deps -d .whl "$FLASH_ATTN_WHEEL"; fi
  fi
  ls -l .whl
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then  # wheels carried along (no index, no network)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/unmask_site .whl/*.whl
  export PYTHONPATH=/tmp/unmask_site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
BENCH=("$PY" scripts/benchmark.py)
step() { echo; echo "== $1"; }

if [[ $MODE == dry ]]; then  # every step below at toy sizes on CPU
  if [[ ${DRY_PYTEST:-1} == 1 ]]; then
    step "gpu tier (skips without CUDA)"
    "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider || [[ $? == 5 ]]
  fi
  step "benchmark, toy sizes"
  # DRY_SECTIONS: a subset (the fast test leaves out `modes`, whose torch.compile takes a while)
  read -r -a SECTIONS <<< "${DRY_SECTIONS:-train loss backbones modes sample}"
  "${BENCH[@]}" --dry-run --sections "${SECTIONS[@]}" --attention sdpa --json "$OUT/dry_run.json"
  echo; echo "dry run done: $OUT/dry_run.json"
  exit 0
fi

"$PY" - <<'EOF'
import importlib.util, torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (use --dry-run on CPU)"
print("card:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| flash-attn", "present" if importlib.util.find_spec("flash_attn") else "absent")
EOF
SMALL=(model=small model.dropout=0.0 --vocab-size 50258 --precision bf16)

step "gpu tier: pytest -m gpu"
timeout 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"

step "train, model=small, bf16, eager (flash-attn where present)"
timeout 60 "${BENCH[@]}" "${SMALL[@]}" --sections train --batch-size 16 --train-steps 10 \
  --json "$OUT/train_eager.json"
step "train, model=small, bf16, torch.compile"
timeout 150 "${BENCH[@]}" "${SMALL[@]}" --sections train --batch-size 16 --train-steps 10 --compile \
  --json "$OUT/train_compile.json"
step "train, model=small, bf16, SDPA only (flash-attn off)"
timeout 60 "${BENCH[@]}" "${SMALL[@]}" --sections train --batch-size 16 --train-steps 10 \
  --attention sdpa --json "$OUT/train_sdpa.json"
step "lean vs full loss and reference backbones, model=small, B=16"
timeout 90 "${BENCH[@]}" "${SMALL[@]}" --sections loss backbones --batch-size 16 --train-steps 6 \
  --json "$OUT/loss_backbones.json"
step "sampling at L=1024: ddpm / ddpm_cache / confidence"
timeout 90 "${BENCH[@]}" "${SMALL[@]}" --sections sample --sample-steps 256 --num-samples 4 \
  --sample-batch-size 1 --json "$OUT/sampling.json"
echo; echo "gpu check done: figures in $OUT/"
