#!/usr/bin/env bash
# The production shape on this machine: the nginx front on http://localhost:$FRONT_PORT
# (8000), buffering whole requests, with gunicorn behind it on 127.0.0.1:$BACKEND_PORT
# (8001). Without AMPLITUDE_SECRET_KEY, scripts/run.sh serves demo data from the simulator,
# exactly as `make run` does. With FRONT_TLS_CERT and FRONT_TLS_KEY, TLS on $FRONT_TLS_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
front_host=${FRONT_HOST:-0.0.0.0}
front_port=${FRONT_PORT:-8000}
backend_port=${BACKEND_PORT:-8001}

nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx_bin" ] || { echo "nginx is not installed: run 'make system-deps'" >&2; exit 1; }

workdir=$(mktemp -d "${TMPDIR:-/tmp}/amplitude-front.XXXXXX")
chmod 755 "$workdir"  # nginx's workers run as another user when started by root
render_args=(--prefix "$workdir" --listen "$front_host:$front_port" --upstream "127.0.0.1:$backend_port"
             --error-log "${FRONT_ERROR_LOG:-/dev/stderr}")
if [ -n "${FRONT_TLS_CERT:-}" ]; then
  render_args+=(--tls-listen "$front_host:${FRONT_TLS_PORT:-8443}")
fi
"$PY" deploy/nginx/render.py "${render_args[@]}" >/dev/null

# gunicorn listens on loopback only and believes X-Forwarded-For from the front alone.
export PORT=$backend_port HOST=127.0.0.1
export TRUSTED_PROXY_COUNT=${TRUSTED_PROXY_COUNT:-1} FORWARDED_ALLOW_IPS=${FORWARDED_ALLOW_IPS:-127.0.0.1}
export PUBLIC_URL="http://localhost:$front_port"

front_pid="" backend_pid=""
stop() {
  trap - EXIT INT TERM
  # SIGQUIT: nginx lets in-flight requests finish; run.sh passes SIGTERM on to gunicorn.
  [ -n "$front_pid" ] && kill -QUIT "$front_pid" 2>/dev/null || true
  [ -n "$backend_pid" ] && kill -TERM "$backend_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$workdir"
}
trap stop EXIT INT TERM

./scripts/run.sh &
backend_pid=$!
# Open the front once gunicorn listens, so the first callers do not meet a 502.
for _ in $(seq 1 150); do
  (exec 3<>"/dev/tcp/127.0.0.1/$backend_port") 2>/dev/null && break
  kill -0 "$backend_pid" 2>/dev/null || exit 1
  sleep 0.2
done
"$nginx_bin" -p "$workdir" -c "$workdir/nginx.conf" -e "${FRONT_ERROR_LOG:-/dev/stderr}" &
front_pid=$!
echo "FRONT: nginx on http://localhost:$front_port${FRONT_TLS_CERT:+ and https://localhost:${FRONT_TLS_PORT:-8443}}," \
     "gunicorn behind it on 127.0.0.1:$backend_port"
# Whichever stops first takes the other down with it.
wait -n "$backend_pid" "$front_pid" || true
