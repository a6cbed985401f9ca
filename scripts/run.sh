#!/usr/bin/env bash
# Serve on $PORT (default 8000). Without AMPLITUDE_SECRET_KEY, serve demo data from the
# built-in Amplitude simulator; with it, proxy the real API.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python

if [ -z "${AMPLITUDE_SECRET_KEY:-}" ]; then
  sim_port=${SIMULATOR_PORT:-8100}
  "$PY" -m simulator --host 127.0.0.1 --port "$sim_port" --secret-key demo-simulator-key &
  sim_pid=$!
  trap 'kill $sim_pid 2>/dev/null || true' EXIT INT TERM
  export AMPLITUDE_SECRET_KEY=demo-simulator-key
  export AMPLITUDE_API_URL="http://127.0.0.1:$sim_port"
  export ALLOW_INSECURE_UPSTREAM=true
  export DEMO_MODE=true
  export PROXY_API_KEYS=${PROXY_API_KEYS:-braze:demo-key}
  export PROFILE_REC_IDS=${PROFILE_REC_IDS:-rec_home,rec_email}
  export PROFILE_PREDICTION_IDS=${PROFILE_PREDICTION_IDS:-pred_churn,pred_purchase}
  echo "DEMO MODE: AMPLITUDE_SECRET_KEY is not set, so the service serves simulated Amplitude data" \
       "from the built-in simulator on $AMPLITUDE_API_URL."
  echo "DEMO MODE: call it with the caller key 'demo-key', for example:" \
       "curl -u braze:demo-key ${PUBLIC_URL:-http://localhost:${PORT:-8000}}/v1/users/user-42/recommendations/rec_home"
  "$PY" -m gunicorn -c gunicorn.conf.py &
  gunicorn_pid=$!
  # Stop gunicorn and wait for it (it lets requests in flight finish), then the simulator.
  stop() {
    trap - EXIT INT TERM
    kill -TERM "$gunicorn_pid" 2>/dev/null || true
    wait "$gunicorn_pid" 2>/dev/null || true
    kill "$sim_pid" 2>/dev/null || true
    wait "$sim_pid" 2>/dev/null || true
  }
  trap stop EXIT INT TERM
  wait "$gunicorn_pid"
else
  exec "$PY" -m gunicorn -c gunicorn.conf.py
fi
