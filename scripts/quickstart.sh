#!/usr/bin/env bash
# The whole flow on the embedded synthetic toy-lesion dataset, no download needed:
#   data -> trainer fit -> trainer evaluate -> export (int8 + float32, validated) -> edge demo.
# Usage: bash scripts/quickstart.sh [OUT_DIR]   (default runs/quickstart; rerunning replaces it)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VIRTUAL_ENV:-$PWD/.venv}/bin"
OUT="${1:-runs/quickstart}"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

step "1/5 generate the toy dataset (HAM10000 layout) in $OUT/toy-data"
"$BIN/trainer" toy-data --out "$OUT/toy-data" --overwrite

step "2/5 train tiny_cnn on it -> $OUT/run"
"$BIN/trainer" fit --config configs/quickstart.yaml --data "$OUT/toy-data" --out "$OUT/run" --overwrite

step "3/5 evaluate on the lesion-grouped validation split"
"$BIN/trainer" evaluate "$OUT/run" --out "$OUT/run/eval-val"

step "4/5 export: full-integer int8 (on-device tier) and float32 (cloud tier), each validated"
# the toy run has ~100 validation images and its gate threshold sits at their 1 % quantile,
# so one image flipping across it moves the gate's agreement by 1 %: allow 5 % here
"$BIN/python" -m export tflite "$OUT/run" --int8 --out "$OUT/bundle-int8" \
    --tolerance gate_agreement=0.95
"$BIN/python" -m export tflite "$OUT/run" --out "$OUT/bundle-float32"

step "5/5 the edge demo's decision on three validation images"
mapfile -t IMAGES < <("$BIN/python" - "$OUT/run/splits.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["split"] == "val"]
for r in rows[:3]:
    print(r["path"])
PY
)
"$BIN/edge-demo" predict --device "$OUT/bundle-int8" --cloud "$OUT/bundle-float32" "${IMAGES[@]}"

step "the page's in-browser runtime (LiteRT.js, pinned in edge_demo/web/package-lock.json)"
if command -v npm >/dev/null; then
  npm ci --prefix edge_demo/web --no-audit --no-fund
else
  echo "npm not found (Debian: sudo apt-get install npm): the demo page will run the device"
  echo "model on the server instead of in the phone's browser. See docs/BROWSER.md."
fi

step "summary"
"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
m = json.loads((out / "run" / "metrics.json").read_text())
v = json.loads((out / "bundle-int8" / "validation.json").read_text())["validation"]
mb = {b: (out / b / "model.tflite").stat().st_size / 1e6 for b in ("bundle-int8", "bundle-float32")}
print(f"""made in {out}:
  toy-data/        synthetic lesions in the HAM10000 layout (not real skin images)
  run/             the trained tiny_cnn (model.keras, model_card.json, metrics, plots)
  bundle-int8/     {mb['bundle-int8']:.2f} MB on-device model, validation {'passed' if v['passed'] else 'REFUSED'}
  bundle-float32/  {mb['bundle-float32']:.2f} MB cloud-tier model
validation split: balanced accuracy {m['balanced_accuracy']:.2f}, melanoma AUC {m['melanoma']['auc']:.2f}
int8 vs float:    {v['heads']['diagnosis']['top1_agreement']:.1%} of diagnoses agree
(a toy model on synthetic data: these figures say the pipeline works, not how well it would
do on real lesions; README.md shows how to train on your own HAM10000 download)""")
PY
cat <<MSG

Next: serve the demo and open it from a phone on your network (http://<this machine's LAN
address>:8080) or on http://127.0.0.1:8080:
  $BIN/edge-demo serve --device $OUT/bundle-int8 --cloud $OUT/bundle-float32 --host 0.0.0.0 --port 8080
MSG
