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
"$BIN/python" -m export tflite "$OUT/run" --int8 --out "$OUT/bundle-int8"
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

cat <<MSG

Done. Try the demo from a phone browser on your network (or http://127.0.0.1:8080):
  $BIN/edge-demo serve --device $OUT/bundle-int8 --cloud $OUT/bundle-float32 --port 8080
MSG
