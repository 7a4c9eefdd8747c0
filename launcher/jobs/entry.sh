#!/bin/sh
# A Ray job's entrypoint: run `-m launcher ARGS` with the Python of the project's environment on
# the head, whatever PATH the Ray processes were started with (`~/venv/bin/ray start` without
# activating the venv leaves `python` pointing elsewhere: "No module named torch").
# The job supervisor that runs this script ($PPID) is a Ray worker started by the cluster's own
# Python, so the environment that runs Ray is the one that loaded ray/_raylet.so into it.
# $TRMGPT_PYTHON, when a node sets it, wins.
set -e
PY="${TRMGPT_PYTHON:-}"
if [ -z "$PY" ] && [ -r "/proc/$PPID/maps" ]; then
  so=$(grep -o '/[^ ]*/site-packages/ray/_raylet[^ ]*\.so' "/proc/$PPID/maps" | head -n 1 || true)
  prefix=${so%/lib/python*/site-packages/ray/*}
  for cand in "$prefix/bin/python" "$prefix/bin/python3"; do
    if [ -n "$so" ] && [ -x "$cand" ]; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  PY=$(command -v python3 || command -v python)
  echo "entry.sh: could not tell which Python runs this cluster's Ray; using $PY" \
       "(set TRMGPT_PYTHON on the nodes)" >&2
fi
echo "entry.sh: $PY -m launcher $*"
exec "$PY" -m launcher "$@"
