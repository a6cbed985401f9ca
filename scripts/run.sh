#!/usr/bin/env bash
# Serve on $PORT (default 8000). With AMPLITUDE_SECRET_KEY (or, in Amplitude's EU region,
# COHORT_WEBHOOK_SECRETS), serve the real project; with neither, serve demo data from the
# built-in Amplitude simulator: its Profile API, and Cohort Webhooks pushes of cohort_vip.
# AMPLITUDE_REGION=eu makes the demo an EU one: no Profile API, cohort pushes only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python

if [ -z "${AMPLITUDE_SECRET_KEY:-}" ] && [ -z "${COHORT_WEBHOOK_SECRETS:-}" ]; then
  sim_port=${SIMULATOR_PORT:-8100}
  "$PY" -m simulator --host 127.0.0.1 --port "$sim_port" --secret-key demo-simulator-key &
  sim_pid=$!
  trap 'kill $sim_pid 2>/dev/null || true' EXIT INT TERM
  if [ "${AMPLITUDE_REGION:-us}" != "eu" ]; then
    export AMPLITUDE_SECRET_KEY=demo-simulator-key
  fi
  export AMPLITUDE_API_URL="http://127.0.0.1:$sim_port"
  export ALLOW_INSECURE_UPSTREAM=true
  export DEMO_MODE=true
  export PROXY_API_KEYS=${PROXY_API_KEYS:-braze:demo-key}
  export PROFILE_REC_IDS=${PROFILE_REC_IDS:-rec_home,rec_email}
  export PROFILE_PREDICTION_IDS=${PROFILE_PREDICTION_IDS:-pred_churn,pred_purchase}
  # Cohort Webhooks: the simulator pushes cohort_vip once the store is open (scripts/demo_cohorts.py).
  export DEMO_ADMIN_KEY=demo-admin-key
  export ADMIN_API_KEYS=${ADMIN_API_KEYS:-ops:$DEMO_ADMIN_KEY}
  export COHORT_WEBHOOK_SECRETS=demo-webhook-secret-0001
  export COHORT_SETTLE_SECONDS=${COHORT_SETTLE_SECONDS:-5}
  export COHORT_REALTIME_IDS=${COHORT_REALTIME_IDS:-cohort_vip}
  region=""
  [ "${AMPLITUDE_REGION:-us}" = "eu" ] && region=" (EU mode: no Profile API; cohort membership from pushes only)"
  echo "DEMO MODE$region: AMPLITUDE_SECRET_KEY is not set, so the service serves simulated Amplitude data" \
       "from the built-in simulator on $AMPLITUDE_API_URL."
  echo "DEMO MODE: call it with the caller key 'demo-key', for example:" \
       "curl -u braze:demo-key ${PUBLIC_URL:-http://localhost:${PORT:-8000}}/v1/users/user-42/recommendations/rec_home"
  "$PY" scripts/demo_cohorts.py &
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
