#!/bin/sh
# The one install step of this package: `make venv` (and so CI), `make test-gpu` and the Dockerfile run it, and
# tests/test_cluster_image.py runs it on the files the Dockerfile copies, so CI proves the image's install.
#   cluster/install.sh PYTHON EXTRAS [PIP_ARGS...]    e.g. cluster/install.sh python gpu
# Run from the directory holding pyproject.toml. Versions are pinned in pyproject.toml; with the `gpu` extra,
# cluster/constraints-gpu.txt also pins the engine stack to the versions the GPU tests passed with.
set -eu
python=$1
extras=$2
shift 2
case ",$extras," in
    *,gpu,*) set -- -c cluster/constraints-gpu.txt "$@" ;;
esac
case " $* " in
    *" -e "* | *" --editable "*)
        # an editable install is a checkout's own (make venv): it builds in place
        "$python" -m pip install -q "$@" ".[$extras]"
        exit 0
        ;;
esac
# Otherwise build from a copy in a fresh temporary folder: setuptools writes build/ and *.egg-info next to
# pyproject.toml, and the folder an image build copied the sources into may belong to root (Kaniko creates
# WORKDIR as root) while pip runs as the image's user. The copy is what pyproject.toml builds from.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -R pyproject.toml README.md omnilmm_ray "$src"/
"$python" -m pip install -q "$@" "$src[$extras]"
