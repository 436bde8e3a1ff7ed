#!/usr/bin/env bash
# The GPU check (issue 20): on a machine with a CUDA GPU, run the CUDA-marked tests and short runs of
# `flad bench encoder`, `flad bench pipeline --quick` and `flad bench llm --quick` on cuda, and print ONE JSON
# summary on stdout (everything else goes to stderr and to $OUT_DIR). Budget: under 8 minutes.
#
#   scripts/gpu_check.sh                 # uses .venv-gpu (created if missing) or $FLAD_GPU_PYTHON
#   FLAD_GPU_PYTHON=/usr/bin/python3 scripts/gpu_check.sh --no-install   # a python that already has CUDA torch
#
# Installing: torch==2.13.0 from PyPI (the default Linux x86_64 / aarch64 wheels are CUDA builds; on a Jetson
# use NVIDIA's JetPack wheel and --no-install) plus FLAD with its `llm` and `test` extras, editable.
# Without a CUDA device the script says so in its JSON and exits 3: the CPU CI stays the gate.
set -uo pipefail
cd "$(dirname "$0")/.."
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
OUT_DIR=${OUT_DIR:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT_DIR"
T0=$(date +%s)
PY=${FLAD_GPU_PYTHON:-}
if [ -z "$PY" ]; then
  if [ "$INSTALL" = 1 ] && [ ! -x .venv-gpu/bin/python ]; then
    echo "gpu_check: creating .venv-gpu" >&2
    python3 -m venv .venv-gpu >&2
  fi
  PY=.venv-gpu/bin/python
  [ -x "$PY" ] || PY=.venv/bin/python
fi
if [ "$INSTALL" = 1 ]; then
  echo "gpu_check: installing torch==2.13.0 (CUDA wheel) and FLAD[llm,test] into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
  timeout 240 "$PY" -m pip install --quiet --progress-bar off torch==2.13.0 >&2 || echo "gpu_check: torch install failed" >&2
  timeout 120 "$PY" -m pip install --quiet --progress-bar off -e '.[test,llm]' >&2 || echo "gpu_check: FLAD install failed" >&2
fi
FLAD=("$PY" -m flad_core.cli)

"$PY" - > "$OUT_DIR/device.json" <<'EOF'
import json
import torch
from flad_core.device import device_info
info = device_info("auto")
info["device_count"] = torch.cuda.device_count()
print(json.dumps(info))
EOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -c "import json,sys; print(json.dumps({'gpu_check': 'no CUDA device', 'device': json.load(open(sys.argv[1]))}))" \
    "$OUT_DIR/device.json" 2>/dev/null || echo '{"gpu_check": "no CUDA device; torch missing"}'
  exit 3
fi

run() {   # run NAME TIMEOUT CMD...: stdout -> $OUT_DIR/NAME.json, stderr -> $OUT_DIR/NAME.log, rc -> NAME.rc
  local name=$1 limit=$2; shift 2
  echo "gpu_check: $name ..." >&2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT_DIR/$name.json" 2> "$OUT_DIR/$name.log"
  echo $? > "$OUT_DIR/$name.rc"
  echo $(( $(date +%s) - t )) > "$OUT_DIR/$name.seconds"
}
NPROC=$(nproc)
run tests 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" test
run encoder 150 "${FLAD[@]}" bench encoder --json -- --device cuda --speed-only --threads "$NPROC"
run pipeline 90 "${FLAD[@]}" bench pipeline --json -- --quick --device cuda --only every-member
run llm 90 "${FLAD[@]}" bench llm --json -- --quick --device cuda

"$PY" - "$OUT_DIR" "$T0" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])

def load(name):
    rc = int((out / f"{name}.rc").read_text()) if (out / f"{name}.rc").exists() else None
    part = {"rc": rc, "seconds": int((out / f"{name}.seconds").read_text()) if (out / f"{name}.seconds").exists() else None}
    try:
        text = (out / f"{name}.json").read_text()
        part["json"] = json.loads(text[text.index("{"):]) if name != "tests" else None
    except (OSError, ValueError):
        part["json"] = None
        part["log_tail"] = (out / f"{name}.log").read_text()[-1500:] if (out / f"{name}.log").exists() else ""
    return part

summary = {"gpu_check": "ran", "device": json.loads((out / "device.json").read_text())}
tests = load("tests")
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
except (OSError, ET.ParseError, IndexError):
    tests["junit"] = "missing"
summary["cuda_tests"] = tests
enc = load("encoder")
if enc["json"]:
    e = enc["json"]
    enc["figures"] = {"training_speed_by_device": e.get("training_speed_by_device"), "goals": e.get("goals"),
                      "tiny_peak_vs_estimate": {k: e["tiny_training_speed"].get(k) for k in
                                                ("peak_train_step_bytes", "profiler_estimate_bytes",
                                                 "estimate_rel_error")}}
    enc["json"] = None     # the full JSON stays in the out folder
summary["encoder"] = enc
for name, keys in (("pipeline", ("throughput_samples_per_s_emulated", "conditions")), ("llm", None)):
    part = load(name)
    if part["json"] and keys:
        part["json"] = {k: part["json"].get(k) for k in keys}
    summary[name] = part
summary["seconds"] = int(time.time()) - int(sys.argv[2])
summary["goal_under_8_min"] = summary["seconds"] < 480
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print(json.dumps(summary, default=str))
EOF
