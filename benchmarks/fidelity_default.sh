#!/usr/bin/env bash
# The teacher-19m student that the documented default path makes, and its fidelity row:
#
#   radistill scan  -> radistill build --keep 16 (default mixer window_recurrent, default state size)
#   -> radistill distill with the default recipe (which mixes in 25% teacher-generated text), its budget capped
#      with --tokens-stage2/--tokens-stage3 (20/80, ~6.8M tokens; the CLI has no other token or time cap)
#   -> benchmarks/fidelity.py --students RUN/stage3: KV by pairs, held-out ppl, fidelity report, records/facts suites
#
#   benchmarks/fidelity_default.sh WORK OUT.json            # GPU
#   benchmarks/fidelity_default.sh --quick WORK OUT.json    # CPU smoke run: tiny budget and settings
#
# Environment: TEACHER (default examples/teacher-19m), DATA (default ../shared/fixtures/corpus/prose-train.txt.xz),
# TOKENS2 / TOKENS3 (stage budgets; default 1,310,720 + 5,505,024 = 6,815,744: whole steps of the default
# 8 x 16 x 2048 = 262,144-token step, 5 + 21 steps). Each step leaves its output in WORK, and a step whose output
# is there is skipped, so a cut run continues where it stopped; fidelity.py rewrites OUT after each row.
set -euo pipefail

QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; shift; fi
if [[ $# -ne 2 ]]; then
    echo "usage: $0 [--quick] WORK OUT.json" >&2
    exit 2
fi
WORK=$1
OUT=$2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TEACHER=${TEACHER:-$ROOT/examples/teacher-19m}
DATA=${DATA:-$ROOT/../shared/fixtures/corpus/prose-train.txt.xz}
for need in "$TEACHER/config.json" "$DATA"; do
    if [[ ! -e "$need" ]]; then echo "error: $need does not exist (set TEACHER / DATA)" >&2; exit 2; fi
done
mkdir -p "$WORK"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
radistill() { python -m radistill.cli "$@"; }
SECONDS=0
stamp() { echo "[fidelity_default] ${SECONDS}s: $*"; }

if [[ $QUICK == 1 ]]; then
    TOKENS2=${TOKENS2:-256}; TOKENS3=${TOKENS3:-256}
    SCAN_OPTS=(--samples 2 --device cpu)
    BUILD_OPTS=(--device cpu)
    DISTILL_OPTS=(--seq-len 128 --micro-batch 2 --grad-accum 1 --device cpu)
    FIDELITY_OPTS=(--quick --suites)  # no capability suites: the smoke run checks the path, not the scores
else
    TOKENS2=${TOKENS2:-1310720}; TOKENS3=${TOKENS3:-5505024}
    SCAN_OPTS=(); BUILD_OPTS=(); DISTILL_OPTS=(); FIDELITY_OPTS=()
fi

stamp "scan"
[[ -f "$WORK/scan/scan.json" ]] || radistill scan "$TEACHER" --out "$WORK/scan" "${SCAN_OPTS[@]}"
stamp "build --keep 16"
[[ -f "$WORK/student/config.json" ]] || \
    radistill build "$TEACHER" --scan "$WORK/scan/scan.json" --keep 16 --out "$WORK/student" "${BUILD_OPTS[@]}"
stamp "distill ($TOKENS2 + $TOKENS3 tokens, default recipe)"
if [[ ! -f "$WORK/run/stage3/config.json" ]]; then
    RESUME=()
    [[ -f "$WORK/run/recipe.json" ]] && RESUME=(--resume)
    radistill distill "$WORK/student" --teacher "$TEACHER" --data "$DATA" --out "$WORK/run" \
        --tokens-stage2 "$TOKENS2" --tokens-stage3 "$TOKENS3" "${DISTILL_OPTS[@]}" "${RESUME[@]}"
fi
stamp "fidelity.py"
python benchmarks/fidelity.py --teacher "$TEACHER" --students "$WORK/run/stage3" --out "$OUT" "${FIDELITY_OPTS[@]}"
stamp "done: $OUT"
