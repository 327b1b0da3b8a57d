#!/usr/bin/env bash
# webui_host.sh — Python environments for the real AUTOMATIC1111 v1.10.1 and Forge hosts the tests run the pack in.
#
#   tools/webui_host.sh install   for each host whose root is set (A1111_ROOT, FORGE_ROOT): a venv in
#                                 .webuihost/<host>/venv with the host's requirements (a no-op when its stamp is current)
#   tools/webui_host.sh status    what is found and installed
#
# A root is either a host folder of the kit (`a1111/` or `forge/`, with `webui/` and `requirements.txt` inside) or a
# web UI checkout itself (with `launch.py`; its `requirements_versions.txt` is installed). A host whose root is unset
# is skipped, and the host tests say that they did not run.
#
# Torch is shared, not installed again (it is ~5.5 GB): the venv gets a .pth file that appends the project venv's
# site-packages to sys.path AFTER its own. Whatever the host pins (gradio, numpy, transformers, ...) is installed into
# the host venv and wins; what it leaves unpinned and the project venv already has (torch 2.14.1 and its CUDA
# libraries) is found there. Both venvs must use the same Python, so the host venv is made from the project venv's
# base interpreter. pip never uninstalls the project venv's copies (they are outside the host environment).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROJECT_VENV=$ROOT/.venv
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
# Both hosts pin pytorch_lightning 1.9.4, whose lightning_fabric imports pkg_resources at start: setuptools 81 removed
# it, and the Forge requirement (setuptools>=77.0.3) alone resolves to a newer one.
EXTRA_PINS=("setuptools<81")
log() { echo "[webui_host $(date +%H:%M:%S)] $*" >&2; }

# host -> its root from the environment (empty when unset)
host_root() { case $1 in a1111) echo "${A1111_ROOT:-}" ;; forge) echo "${FORGE_ROOT:-}" ;; esac; }

# The web UI tree of a root, and its requirement file: the kit's (made to install beside torch 2.14.1) or a
# checkout's own pins.
webui_of() { if [ -f "$1/webui/launch.py" ]; then echo "$1/webui"; else echo "$1"; fi; }
requirements_of() {
  if [ -f "$1/webui/launch.py" ]; then echo "$1/requirements.txt"; else echo "$1/requirements_versions.txt"; fi
}

# Pins for what a host's launcher would clone into webui/repositories/ and the tree lacks, where PyPI has the same
# code: Forge's huggingface_guess at the commit its launcher pins (84826248) is huggingface-guess 0.1.0 (same files).
# A1111's (Stability's ldm and sgm, k-diffusion) are not on PyPI at its pins: without them it cannot start.
repository_pins() {
  local host=$1 webui=$2
  case $host in
    forge) [ -d "$webui/repositories/huggingface_guess" ] || echo "huggingface-guess==0.1.0" ;;
    a1111) [ -d "$webui/repositories/stable-diffusion-stability-ai" ] || return 1 ;;
  esac
}

install_host() {
  local host=$1 root; root=$(host_root "$host")
  if [ -z "$root" ]; then log "$host: ${host^^}_ROOT is not set; its host tests will not run"; return; fi
  root=$(cd "$root" && pwd)
  local req; req=$(requirements_of "$root")
  [ -f "$req" ] || { log "ERROR: $host: no $req (expected a kit host folder with webui/ or a web UI checkout)"; exit 1; }
  local pins
  if ! pins=$(repository_pins "$host" "$(webui_of "$root")"); then
    log "$host: $(webui_of "$root")/repositories is incomplete; its host tests will not run (they say why)"; return
  fi
  local venv=$ROOT/.webuihost/$host/venv
  local site; site=$("$PROJECT_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
  local stamp=$venv/.esd-stamp
  local want; want=$( (cat "$req" "$0" "$PROJECT_VENV/.esd-stamp" 2>/dev/null; echo "$site $pins") | sha256sum | cut -c1-16)
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "$host: venv current at $venv"; return
  fi
  local t0=$SECONDS base
  base=$("$PROJECT_VENV/bin/python" -c "import sys; print(sys._base_executable)")
  rm -rf "$venv"
  "$base" -m venv "$venv"
  local own; own=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
  # "zz": .pth files are read in name order; a line that is a path is appended to sys.path, after the venv's own.
  echo "$site" > "$own/zz-esd-project-venv.pth"
  log "$host: installing $req into $venv (torch shared from $site)"
  # torch pinned in the same resolve: it is already satisfied through the .pth, so nothing swaps in another build.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" "${TORCH_PINS[@]}" "${EXTRA_PINS[@]}" $pins 2>&1 \
    | grep -v "is ignored: it is neither\|^Not uninstalling\|outside environment\|dependency resolver does not\|requires .*, but you have" \
    || true
  # Prove the sharing: torch comes from the project venv, the host's own pins from the host venv.
  "$venv/bin/python" -W ignore - "$site" "$own" <<'EOF'
import sys, torch, gradio, pkg_resources
site, own = sys.argv[1:]
assert torch.__file__.startswith(site), f"torch not shared: {torch.__file__}"
assert gradio.__file__.startswith(own), f"gradio not from the host venv: {gradio.__file__}"
print(f"torch {torch.__version__} from the project venv; gradio {gradio.__version__} from the host venv", file=sys.stderr)
EOF
  echo "$want" > "$stamp"
  log "$host: venv ready in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"
}

status() {
  for host in a1111 forge; do
    local root; root=$(host_root "$host") venv=$ROOT/.webuihost/$host/venv
    if [ -z "$root" ]; then echo "$host: ${host^^}_ROOT not set"; continue; fi
    echo "$host: root $root; venv $( [ -f "$venv/.esd-stamp" ] && echo "$venv" || echo missing)"
  done
}

case "${1:-}" in
  install) "$ROOT/tools/setup_venv.sh"; install_host a1111; install_host forge ;;
  status) status ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
