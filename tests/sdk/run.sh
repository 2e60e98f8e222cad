#!/usr/bin/env bash
# Runs the official-SDK checks (runware_py, runware_js, modelslab_py) against sd-serve.
#
# Usage: tests/sdk/run.sh [path/to/sd-serve]
#   default binary: target/release/sd-serve, else target/debug/sd-serve (this script builds nothing).
# Environment:
#   SD_SERVE_SDKS      which checks to run (default "runware_py runware_js modelslab_py")
#   SD_SERVE_SDK_VENV  Python venv to create/use (default tests/sdk/.venv)
#   PYTHON             interpreter that creates the venv (default python3)
#   SD_SERVE_TIMEOUT   seconds allowed per generation inside the scripts (default 300)
#   KEEP_LOGS=1        keep the server logs and data folders even when everything passed
# Starts two servers on 127.0.0.1 with free ports: one with tests/sdk/server.toml, one with
# tests/sdk/server-processing.toml ([modelslab] wait_secs = 0, for the fetch check). Both are
# stopped with SIGTERM at the end. Prints one PASS/FAIL line per SDK; exits non-zero on any FAIL.
set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SDKS=${SD_SERVE_SDKS:-runware_py runware_js modelslab_py}
VENV=${SD_SERVE_SDK_VENV:-$HERE/.venv}
PYTHON=${PYTHON:-python3}
RUNWARE_JS_VERSION=1.3.2 # keep in step with package.json / package-lock.json
KEY="sdk-test-$$-$RANDOM"

BIN=${1:-}
if [ -z "$BIN" ]; then
  if [ -x "$ROOT/target/release/sd-serve" ]; then
    BIN=$ROOT/target/release/sd-serve
  elif [ -x "$ROOT/target/debug/sd-serve" ]; then
    BIN=$ROOT/target/debug/sd-serve
  else
    echo "run.sh: no sd-serve binary; build one (cargo build --release) or pass its path" >&2
    exit 2
  fi
fi
[ -x "$BIN" ] || { echo "run.sh: $BIN is not an executable" >&2; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

wants() { case " $SDKS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---- clients -----------------------------------------------------------------------------------

if wants runware_py || wants modelslab_py; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating $VENV"
    "$PYTHON" -m venv "$VENV" || { echo "run.sh: could not create a venv with $PYTHON" >&2; exit 2; }
  fi
  STAMP="$VENV/.sd-serve-sdk-requirements"
  if ! cmp -s "$HERE/requirements.txt" "$STAMP"; then
    echo "run.sh: installing tests/sdk/requirements.txt into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" \
      || { echo "run.sh: pip install failed" >&2; exit 2; }
    cp "$HERE/requirements.txt" "$STAMP"
  fi
fi

if wants runware_js; then
  command -v node >/dev/null || { echo "run.sh: node (>= 18) is needed for runware_js" >&2; exit 2; }
  have=$(node -e 'try{console.log(require(process.argv[1]).version)}catch{}' \
    "$HERE/node_modules/@runware/sdk-js/package.json" 2>/dev/null)
  if [ "$have" != "$RUNWARE_JS_VERSION" ]; then
    echo "run.sh: installing @runware/sdk-js $RUNWARE_JS_VERSION into tests/sdk/node_modules"
    (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error) \
      || { echo "run.sh: npm ci failed" >&2; exit 2; }
  fi
fi

# ---- servers -----------------------------------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sd-serve-sdk.XXXXXX")
PIDS=()

stop_servers() {
  local pid i
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || continue
    for i in $(seq 1 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "run.sh: server $pid still running 15 s after SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
  done
  PIDS=()
}
trap stop_servers EXIT
trap 'exit 130' INT TERM

# start_server NAME CONFIG: starts sd-serve, waits for its "listening" line, sets ADDR.
start_server() {
  local name=$1 config=$2 dir=$TMP/$1 line="" pid i
  mkdir -p "$dir/data"
  "$BIN" serve --config "$config" --models "$ROOT/tests/fixtures/models.toml" \
    --listen 127.0.0.1:0 --api-key "$KEY" --data-dir "$dir/data" --device cpu \
    --allow-private-urls >"$dir/stdout.log" 2>"$dir/stderr.log" &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 1 1200); do
    line=$(grep -m1 -o 'sd-serve listening on [^ ]*' "$dir/stdout.log" 2>/dev/null)
    [ -n "$line" ] && break
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run.sh: sd-serve ($name) exited before listening; its stderr:" >&2
      tail -n 30 "$dir/stderr.log" >&2
      return 1
    fi
    sleep 0.1
  done
  if [ -z "$line" ]; then
    echo "run.sh: sd-serve ($name) printed no 'listening' line within 120 s" >&2
    tail -n 30 "$dir/stderr.log" >&2
    return 1
  fi
  ADDR=${line##* }
  echo "run.sh: sd-serve ($name) on $ADDR, pid $pid, logs in $dir"
}

start_server main "$HERE/server.toml" || exit 2
MAIN_URL="http://$ADDR"
PROCESSING_URL=""
if wants modelslab_py; then
  start_server processing "$HERE/server-processing.toml" || exit 2
  PROCESSING_URL="http://$ADDR"
fi

# ---- checks ------------------------------------------------------------------------------------

export SD_SERVE_URL=$MAIN_URL SD_SERVE_KEY=$KEY SD_SERVE_URL_PROCESSING=$PROCESSING_URL
declare -A RESULT
failed=0
for sdk in $SDKS; do
  echo "== $sdk"
  case $sdk in
    runware_py) "$VENV/bin/python" "$HERE/runware_py.py" ;;
    runware_js) node "$HERE/runware_js.mjs" ;;
    modelslab_py) "$VENV/bin/python" "$HERE/modelslab_py.py" ;;
    *) echo "run.sh: unknown SDK check '$sdk'" >&2; false ;;
  esac 2>&1 | tee "$TMP/$sdk.log"
  if [ "${PIPESTATUS[0]}" -eq 0 ]; then RESULT[$sdk]=PASS; else RESULT[$sdk]=FAIL; failed=1; fi
done

stop_servers

echo "== summary"
for sdk in $SDKS; do
  printf '%-13s %s  %s\n' "$sdk" "${RESULT[$sdk]}" "$(tail -n 1 "$TMP/$sdk.log" 2>/dev/null)"
done
if [ "$failed" -ne 0 ] || [ "${KEEP_LOGS:-0}" = 1 ]; then
  echo "run.sh: logs kept in $TMP"
else
  rm -rf "$TMP"
fi
exit "$failed"
