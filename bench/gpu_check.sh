#!/usr/bin/env bash
# GPU truth kit: every GPU path of Sightline on this machine, into a short Markdown report
# ($OUT/gpu-check.md when OUT is set, else the path given, else stdout). See bench/gpu_check.py
# and docs/gpu-check.md. No network and no install: the tree goes on PYTHONPATH and the
# image's own packages serve; wheels carried in $SIGHTLINE_WHEELS (default bench/wheels/,
# if present) go into a scratch directory, never into the image's site-packages. Reruns
# find the machine as the first run left it. Exits 0 when nothing that ran failed (on a
# CPU machine every step is skipped, with the reason), 1 when a step failed.
#
#   bash bench/gpu_check.sh [REPORT.md]
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python)}"
limit="${GPU_CHECK_TIMEOUT:-290}"  # seconds; the whole kit must fit in 5 minutes
report=()
if [[ $# -gt 0 ]]; then report=(--report "$1"); fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

wheels="${SIGHTLINE_WHEELS:-$root/bench/wheels}"
if compgen -G "$wheels/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/sightline-gpu-check-site"
    "$python" -m pip install --quiet --no-index --no-deps --upgrade --target "$site" \
        "$wheels"/*.whl || echo "gpu_check: carried wheels did not install; going on" >&2
    # PYTHONPATH comes before site-packages: carry only what the image lacks.
    export PYTHONPATH="$PYTHONPATH:$site"
fi

cd "$root" || exit 2
exec timeout --kill-after=10 "$limit" "$python" bench/gpu_check.py "${report[@]}"
