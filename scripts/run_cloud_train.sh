#!/usr/bin/env bash
# Train in the background so the run survives the SSH session closing.
#
#   bash scripts/run_cloud_train.sh EXPERIMENT [train options and key=value overrides...]
#   bash scripts/run_cloud_train.sh exp_hr_routing training.epochs=2
#   bash scripts/run_cloud_train.sh exp_hr_routing --resume        # continue after a crash or a reboot
#
# Runs `main.py train --data <data.train_file> --experiment EXPERIMENT --output outputs/models/EXPERIMENT` in
# its own session (setsid: no SIGHUP from the terminal; nohup: belt and braces; stdin from /dev/null), logging
# to <logging.log_dir>/EXPERIMENT_<timestamp>.log. Environment overrides: DATA, OUTPUT, LOG_DIR, PYTHON.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash scripts/run_cloud_train.sh EXPERIMENT [train options and key=value overrides...]" >&2
    exit 2
fi
EXP=$1
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

# data.train_file and logging.log_dir as the experiment configures them (a bad experiment name fails here, fast).
mapfile -t CONF < <("$PY" - "$EXP" <<'EOF'
import sys
from src.utils.config_loader import load_config
from src.utils.errors import UserError
try:
    cfg = load_config(experiment=sys.argv[1])
except UserError as exc:
    sys.exit(f"error: {exc}")
print(cfg.data.train_file)
print(cfg.logging.log_dir)
EOF
)
[[ ${#CONF[@]} -eq 2 ]] || exit 2
DATA=${DATA:-${CONF[0]}}
OUTPUT=${OUTPUT:-outputs/models/$EXP}
LOG_DIR=${LOG_DIR:-${CONF[1]}}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/${EXP}_$(date +%Y%m%d_%H%M%S).log"

# A background job of a script is not a process-group leader, so setsid execs in place: $! is the trainer's pid.
PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-120} setsid nohup "$PY" main.py train \
    --data "$DATA" --experiment "$EXP" --output "$OUTPUT" "$@" </dev/null >"$LOG" 2>&1 &
PID=$!

echo "training started: pid $PID"
echo "  experiment: $EXP   data: $DATA   output: $OUTPUT"
echo "  log:    tail -f $LOG"
echo "  stop:   kill $PID     (resume later: bash scripts/run_cloud_train.sh $EXP --resume)"
