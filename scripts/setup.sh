#!/usr/bin/env bash
# One setup command: a virtual environment with this machine's torch build, solo-deepfusion and
# its host, solo-learn. Each checkout gets its own environment, so a checkout never runs another
# one's code: ~/.cache/solo-deepfusion/venvs/<checkout folder>-<hash of its path and of the
# interpreter>, linked as .venv ($SOLO_DEEPFUSION_VENV picks another place; a real .venv folder
# in the checkout is used as it is). $PYTHON picks the interpreter (default python3; >= 3.11).
#
#   bash scripts/setup.sh           set up (again: only what is missing)
#   bash scripts/setup.sh --link    link .venv to this checkout's environment, print it, stop
#
# solo-learn >= 1.0.6 is not on PyPI. It is installed from the first source that is there:
#   1. $SOLO_LEARN_SOURCE: a solo-learn source folder or archive (.tar.gz, .zip);
#   2. ../shared/host/solo-learn-*.tar.gz: the upstream source at the commit the `solo` extra pins,
#      checked against the SHA256SUMS beside it;
#   3. the `solo` extra from GitHub.
# Where none can be had, one line says so and the host-free install is left working.
# A source archive is unpacked into the environment and installed editable, so solo-learn's own
# recipes (scripts/pretrain/...) stay next to its package for the tests and for users.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout="$(pwd -P)"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "PYTHON=$python: no such interpreter" >&2; exit 2; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "$python is Python $("$python" -c 'import platform; print(platform.python_version())'); solo-deepfusion needs >= 3.11" >&2; exit 2; }

if [ -d .venv ] && [ ! -L .venv ]; then
  venv="$checkout/.venv"
else
  interpreter="$("$python" -c 'import sys; print(sys.executable)')"
  key="$(printf '%s\n%s\n' "$checkout" "$interpreter" | sha256sum | cut -c1-12)"
  venv="${SOLO_DEEPFUSION_VENV:-$HOME/.cache/solo-deepfusion/venvs/$(basename "$checkout")-$key}"
  if [ -L .venv ] && [ "$(readlink .venv)" != "$venv" ]; then
    echo "setup: .venv pointed at $(readlink .venv); now at this checkout's own $venv" >&2
    rm .venv
  fi
  [ -L .venv ] || ln -s "$venv" .venv
fi
if [ "${1:-}" = "--link" ]; then
  echo "$venv"
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
# A shared $SOLO_DEEPFUSION_VENV: say so when it ran another checkout's code until now.
owner="$(cd / && "$py" -c 'import pathlib, solo_deepfusion as s; print(pathlib.Path(s.__file__).resolve().parents[1])' 2>/dev/null || true)"
if [ -n "$owner" ] && [ "$owner" != "$checkout" ]; then
  echo "setup: $venv ran the code of $owner; it now runs this checkout's ($checkout)" >&2
fi
pip=("$py" -m pip install -q --disable-pip-version-check)

# solo-learn's setup.py imports pkg_resources (gone from setuptools >= 81), and torchmetrics < 0.12
# imports it at run time: the constraint holds for the build and for the environment.
constraints="$venv/solo-deepfusion-constraints.txt"
printf 'setuptools<81\ntorch==2.14.1\ntorchvision==0.29.1\n' >"$constraints"
export PIP_CONSTRAINT="$constraints"

"${pip[@]}" torch==2.14.1 torchvision==0.29.1
# SOLO_DEEPFUSION_EXTRAS: the extras of solo-deepfusion to install (CI adds `dali`).
"${pip[@]}" -e ".[${SOLO_DEEPFUSION_EXTRAS:-dev}]"

host_pin="$("$py" -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))
print(next(r for r in d["project"]["optional-dependencies"]["solo"] if r.startswith("solo-learn")).rsplit("@", 1)[1])')"
host_deps=("lightning>=2.1.2,<2.7" "torchmetrics>=0.11,<0.12" "setuptools<81")

# Unpack a solo-learn archive once into the environment; print the source folder.
unpack() {
  local archive="$1" dest
  dest="$(basename "$archive")"  # the file name: a dot in a folder above never counts
  dest="$venv/src/${dest%%.*}"
  if [ ! -f "$dest/setup.py" ]; then
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    case "$archive" in
      *.zip) "$py" -m zipfile -e "$archive" "$dest.tmp" ;;
      *) tar -xzf "$archive" -C "$dest.tmp" ;;
    esac
    local top
    top="$(find "$dest.tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
    [ -f "$top/setup.py" ] || { echo "no setup.py in $archive" >&2; return 1; }
    rm -rf "$dest" && mv "$top" "$dest" && rm -rf "$dest.tmp"
  fi
  echo "$dest"
}

source_dir=""
shared_host="$(cd .. && pwd)/shared/host"
if [ -n "${SOLO_LEARN_SOURCE:-}" ]; then
  if [ -d "$SOLO_LEARN_SOURCE" ]; then source_dir="$SOLO_LEARN_SOURCE"
  elif [ -f "$SOLO_LEARN_SOURCE" ]; then source_dir="$(unpack "$SOLO_LEARN_SOURCE")"
  else echo "SOLO_LEARN_SOURCE=$SOLO_LEARN_SOURCE is neither a folder nor an archive" >&2; exit 2
  fi
else
  archive="$(ls "$shared_host"/solo-learn-"$host_pin"*.tar.gz 2>/dev/null | head -n 1 || true)"
  if [ -n "$archive" ]; then
    (cd "$shared_host" && sha256sum --quiet -c SHA256SUMS) \
      || { echo "$archive does not match its SHA256SUMS; not installing it" >&2; exit 1; }
    source_dir="$(unpack "$archive")"
  fi
fi

if [ -n "$source_dir" ]; then
  "${pip[@]}" -e "$source_dir" "${host_deps[@]}"
elif ! "${pip[@]}" -e ".[${SOLO_DEEPFUSION_EXTRAS:-dev},solo]" 2>/dev/null; then
  echo "solo-learn could not be installed (no \$SOLO_LEARN_SOURCE, no shared/host archive, no GitHub):" \
    "the host-free parts (heads, fusion, hub, demo) work; the solo-learn integration does not." >&2
  exit 0
fi
"$py" -c "from solo_deepfusion._host import host_problem; p = host_problem(); assert p is None, p"
