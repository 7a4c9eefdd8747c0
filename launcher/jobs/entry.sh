#!/bin/sh
# A Ray job's entrypoint: run `-m launcher ARGS` with the Python of the project's environment on
# the head, whatever PATH the Ray processes were started with (`~/venv/bin/ray start` without
# activating the venv leaves `python` pointing elsewhere: "No module named torch").
# The job supervisor that runs this script (our parent, or the shell's parent that Ray's
# `shell=True` starts) is a Ray worker started by the cluster's own Python, so the environment
# that runs Ray is the one that loaded ray/_raylet.so into it. $TRMGPT_PYTHON, when set, wins.
set -e
PY="${TRMGPT_PYTHON:-}"
pid=$PPID
for _ in 1 2 3 4 5; do
  [ -n "$PY" ] || [ ! -r "/proc/$pid/maps" ] && break
  so=$(grep -o '/[^ ]*/site-packages/ray/_raylet[^ ]*\.so' "/proc/$pid/maps" | head -n 1 || true)
  if [ -n "$so" ]; then
    prefix=${so%/lib/python*/site-packages/ray/*}
    for cand in "$prefix/bin/python" "$prefix/bin/python3"; do
      if [ -x "$cand" ]; then PY="$cand"; break; fi
    done
    break
  fi
  pid=$(awk '{print $4}' "/proc/$pid/stat")
done
if [ -z "$PY" ]; then
  PY=$(command -v python3 || command -v python)
  echo "entry.sh: could not tell which Python runs this cluster's Ray; using $PY" \
       "(set TRMGPT_PYTHON on the nodes)" >&2
fi
echo "entry.sh: $PY -m launcher $*"
exec "$PY" -m launcher "$@"
