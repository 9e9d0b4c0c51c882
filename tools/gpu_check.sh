#!/usr/bin/env bash
# Every GPU check of xloss in one call (issue 15): run it on a machine with an NVIDIA GPU, then commit the CSVs.
#
#   bash tools/gpu_check.sh [OUT]          on a GPU: at most ~8 minutes; CSVs and logs go to OUT
#                                          (default benchmarks/results/gpu)
#   bash tools/gpu_check.sh --tiny [OUT]   anywhere (CI): the same steps with TRITON_INTERPRET=1 on the CPU and
#                                          tiny shapes, so that the script is known to work before a GPU comes
#
# Steps (each one's log in OUT; a failing step is reported and the script goes on, exit status 1 at the end):
#   1. the Triton tests compiled for the GPU (TRITON_INTERPRET=0): every family's kernels against the references;
#   2. the CUDA Banzhaf op's tests;
#   3. the GPU benchmark presets: InfoNCE N = M = 65536, D = 768, bf16 against naive and inf-cl ("gpu"), the
#      sigmoid loss at the same shape ("gpu-sigmoid"), late interaction at the ColBERT and ColPali training shapes
#      and scoring against flash-maxsim ("gpu-late-interaction"), structured and soft targets ("groups",
#      "distill"), grouped distillation and XTR at the training shapes ("late-interaction-training").  Baselines
#      that are not installed are reported as unavailable in the CSV, not as failures.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
FAILED=()

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to OUT/NAME.log
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "== $name: $*"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s), last lines of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log" | sed 's/^/   | /'
    FAILED+=("$name")
  fi
}

python -c "import torch, xloss; print('xloss', xloss.__version__, 'torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', \
xloss.available_backends())" | tee "$OUT/environment.txt"

TRITON_TESTS=(tests/test_info_nce_triton.py tests/test_infonce_targets_triton.py tests/test_sigmoid_triton.py
              tests/test_late_interaction_triton.py tests/test_gram_triton.py tests/test_symile_triton.py)
for t in tests/test_soft_targets_triton.py tests/test_infonce_matryoshka.py tests/test_xtr_triton.py; do [ -f "$t" ] && TRITON_TESTS+=("$t"); done

if [ "$TINY" = 1 ]; then
  export TRITON_INTERPRET=1
  step triton-tests 900 python -m pytest -q -x "${TRITON_TESTS[@]}"
  step banzhaf-op-tests 300 python -m pytest -q -x tests/test_banzhaf.py -k "cuda or compiled"
  BENCH=(--device cpu --dtype float32 --runs 1 --no-plot --out "$OUT")
  step bench-info-nce 300 python -m xloss.bench --family info_nce --sizes 64 --dim 32 "${BENCH[@]}"
  step bench-sigmoid 300 python -m xloss.bench --family sigmoid --sizes 64 --dim 32 "${BENCH[@]}"
  step bench-late-interaction 300 python -m xloss.bench --family late_interaction --sizes 4 --dim 16 \
    --baselines naive,flash_maxsim "${BENCH[@]}"
  step bench-groups 300 python -m xloss.bench --family info_nce_groups --sizes 64 --dim 32 "${BENCH[@]}"
  step bench-distill 300 python -m xloss.bench --family distill --sizes 64 --dim 32 "${BENCH[@]}"
  step bench-xtr 300 python -m xloss.bench --family xtr --sizes 4 --dim 16 "${BENCH[@]}"
else
  export TRITON_INTERPRET=0
  step triton-tests 240 python -m pytest -q "${TRITON_TESTS[@]}"
  step banzhaf-op-tests 60 python -m pytest -q tests/test_banzhaf.py -k "cuda or compiled"
  step bench-gpu 120 python -m xloss.bench --preset gpu --device cuda --runs 3 --no-plot --out "$OUT"
  step bench-gpu-sigmoid 60 python -m xloss.bench --preset gpu-sigmoid --device cuda --runs 3 --no-plot --out "$OUT"
  step bench-gpu-late-interaction 90 python -m xloss.bench --preset gpu-late-interaction --device cuda --runs 3 \
    --no-plot --out "$OUT"
  step bench-groups 60 python -m xloss.bench --preset groups --device cuda --runs 3 --no-plot --out "$OUT"
  step bench-distill 60 python -m xloss.bench --preset distill --device cuda --runs 3 --no-plot --out "$OUT"
  step bench-late-interaction-training 90 python -m xloss.bench --preset late-interaction-training --device cuda \
    --runs 3 --no-plot --out "$OUT"
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu_check: every step passed; CSVs and logs in $OUT"
