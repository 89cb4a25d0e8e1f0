#!/usr/bin/env bash
# Screenshots of the MLflow UI after `make run` (README, "A tour of the MLflow UI"): starts `mlflow server` on the
# store of this checkout, takes headless Chromium screenshots of the runs table, the compare view, the model page
# and the registered model, and stops the server. Needs Debian's chromium (apt-get install chromium).
#   bash experiments/figures/ui_screenshots.sh [STORE_URI]
set -euo pipefail
cd "$(dirname "$0")/../.."
store=${1:-sqlite:///mlruns.db}
port=${PORT:-5055}
out=experiments/figures
.venv/bin/mlflow server --backend-store-uri "$store" -h 127.0.0.1 -p "$port" --workers 1 >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
api="http://127.0.0.1:$port/api/2.0/mlflow"
experiment=$(curl -sf "$api/experiments/get-by-name?experiment_name=bin-counter" | .venv/bin/python -c \
  'import json,sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')
runs=$(.venv/bin/python - "$api" "$experiment" <<'PY'
import json, sys, urllib.request
api, experiment = sys.argv[1:]
request = urllib.request.Request(f"{api}/runs/search", json.dumps({"experiment_ids": [experiment]}).encode(),
                                 {"Content-Type": "application/json"})
runs = json.load(urllib.request.urlopen(request))["runs"]
command = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]}.get("bin_counter.command")
           for r in runs}
print(json.dumps([run for run, name in command.items() if name in ("main", "train", "evaluate")][:4]))
PY
)
model=$(curl -sf -X POST "$api/logged-models/search" -H 'Content-Type: application/json' \
  -d "{\"experiment_ids\": [\"$experiment\"]}" | .venv/bin/python -c \
  'import json,sys; print(json.load(sys.stdin)["models"][0]["info"]["model_id"])')
shot() {  # name, url
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --virtual-time-budget=20000 --screenshot="$out/$1.png" "$2" >/dev/null 2>&1
  echo "$out/$1.png"
}
base="http://127.0.0.1:$port/#"
shot ui_runs "$base/experiments/$experiment/runs?orderByKey=metrics.%60test%2Faccuracy%60&orderByAsc=false"
shot ui_compare "$base/compare-runs?runs=$(.venv/bin/python -c 'import sys,urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$runs")&experiments=%5B%22$experiment%22%5D"
shot ui_model "$base/experiments/$experiment/models/$model"
shot ui_registry "$base/models/bin-counter-sample"
