#!/usr/bin/env bash
# Regenerate docs/RESULTS.md: every sweep and study behind it (each resumable: finished runs are
# skipped), then scripts/make_results.py. Three seeds per setting. Hours on 2 cores: run it in the
# background (`nohup bash scripts/regenerate_results.sh > regenerate.log 2>&1 &`); OUT defaults to
# ./sweeps. Each command is also written beside its finding in docs/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-sweeps}"
facefl=".venv/bin/facefl --no-progress"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" FACEFL_THREADS="${FACEFL_THREADS:-1}"

# MINT at the paper's terms (docs/sweeps/mint.toml): without DP and at epsilon 8, three seeds.
for s in 0 1 2; do
  for dp in "--set dp.mode=off" ""; do
    tag="seed$s${dp:+-nodp}"
    [ -e "$OUT/mint/.done-$tag" ] && continue
    $facefl mint-study docs/sweeps/mint.toml --set seed=$s $dp --out "$OUT/mint" && touch "$OUT/mint/.done-$tag"
  done
done

# MOTE's gender inference and fairness on an accurate backbone (docs/sweeps/gender.toml).
$facefl sweep docs/sweeps/gender.toml --grid dp.target_epsilon=8,inf --seeds 3 --references 4 --out "$OUT/gender"

# FD-MIA pairs that meet the premise (docs/sweeps/fdmia.toml): reweight and fair_mixup twins, central
# (one client) and federated, each in its own sweep (a sweep pairs a biased run with the first other
# fairness method of its grid). The reweight sweeps' epsilon grid is also finding 2's DP series.
central="--grid split.num_clients=1 --grid federation.min_train_clients=1 --grid federation.min_available_clients=1"
$facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,reweight --grid dp.target_epsilon=1,8,inf \
    --seeds 3 --references 4 --out "$OUT/fdmia-reweight"
$facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,reweight --grid dp.target_epsilon=inf $central \
    --seeds 3 --references 4 --out "$OUT/fdmia-reweight-central"
$facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,fair_mixup --grid fairness.lam=1 \
    --grid dp.target_epsilon=inf $central --seeds 3 --references 4 --out "$OUT/fdmia-mixup-central"
$facefl sweep docs/sweeps/fdmia.toml --grid fairness.method=none,fair_mixup --grid fairness.lam=4 \
    --grid dp.target_epsilon=inf --seeds 3 --references 4 --out "$OUT/fdmia-mixup"

.venv/bin/python scripts/make_results.py "$OUT/fdmia-reweight" "$OUT/fdmia-reweight-central" \
    "$OUT/fdmia-mixup-central" "$OUT/fdmia-mixup" "$OUT/gender" --mint-studies "$OUT/mint" \
    --out docs/RESULTS.md --assets docs/results
