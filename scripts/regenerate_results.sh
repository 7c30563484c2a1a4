#!/usr/bin/env bash
# Regenerate docs/RESULTS.md: every sweep and study behind it, three seeds per setting (each step is
# resumable: finished runs are skipped), then scripts/make_results.py. About 3 core-hours (measured
# 2026-12-07: 75 minutes on 2 cores);
# run two halves side by side, then the report:
#   nohup bash scripts/regenerate_results.sh fdmia > fdmia.log 2>&1 &
#   nohup bash scripts/regenerate_results.sh mint gender > rest.log 2>&1 &
#   bash scripts/regenerate_results.sh report          # once both have finished
# No argument runs every step in turn. OUT (default ./sweeps) holds the sweeps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-sweeps}"
facefl=".venv/bin/facefl --no-progress"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" FACEFL_THREADS="${FACEFL_THREADS:-1}"

mint() {  # MINT at the paper's terms (docs/sweeps/mint.toml): without DP and at epsilon 8
  for s in 0 1 2; do
    for dp in "--set dp.mode=off" ""; do
      tag="seed$s${dp:+-nodp}"
      [ -e "$OUT/mint/.done-$tag" ] && continue
      $facefl mint-study docs/sweeps/mint.toml --set seed=$s $dp --out "$OUT/mint"
      touch "$OUT/mint/.done-$tag"
    done
  done
}

gender() {  # MOTE's gender inference and fairness on an accurate backbone (docs/sweeps/gender.toml)
  $facefl sweep docs/sweeps/gender.toml --grid dp.target_epsilon=8,inf --seeds 3 --references 4 --out "$OUT/gender"
}

fdmia() {  # FD-MIA pairs that meet the premise (docs/sweeps/fdmia.toml), reweight and fair_mixup twins,
  # central (one client) and federated, each in its own sweep (a sweep pairs a biased run with the
  # first other fairness method of its grid); the reweight epsilon grid is also finding 2's DP series
  local central="--grid split.num_clients=1 --grid federation.min_train_clients=1 --grid federation.min_available_clients=1"
  $facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,reweight --grid dp.target_epsilon=1,8,inf \
      --seeds 3 --references 4 --out "$OUT/fdmia-reweight"
  $facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,reweight --grid dp.target_epsilon=inf $central \
      --seeds 3 --references 4 --out "$OUT/fdmia-reweight-central"
  $facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,fair_mixup --grid fairness.lam=1 \
      --grid dp.target_epsilon=inf $central --seeds 3 --references 4 --out "$OUT/fdmia-mixup-central"
  $facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,fair_mixup --grid fairness.lam=4 \
      --grid dp.target_epsilon=inf --seeds 3 --references 4 --out "$OUT/fdmia-mixup"
}

report() {
  .venv/bin/python scripts/make_results.py "$OUT/fdmia-reweight" "$OUT/fdmia-reweight-central" \
      "$OUT/fdmia-mixup-central" "$OUT/fdmia-mixup" "$OUT/gender" --mint-studies "$OUT/mint" \
      --out docs/RESULTS.md --assets docs/results
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(mint gender fdmia report)
for step in "${steps[@]}"; do
  case "$step" in
    mint|gender|fdmia|report) "$step" ;;
    *) echo "regenerate_results.sh: unknown step '$step' (expected mint, gender, fdmia or report)" >&2; exit 2 ;;
  esac
done
