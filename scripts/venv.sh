# Sourced by the quick-start scripts: make sure .venv exists and holds this package with
# its dev extras (re-installed when pyproject.toml changes), then put it first on PATH.
# Needs only python3 (3.11+) with venv and pip, and the package registry.
VENV="${DHT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.dht-installed"
# The forwarder extra (dht forwarder) builds NetfilterQueue from source: only where
# libnetfilter-queue's headers are (.ci/run installs them as root); the core package
# never needs it.
extras="dev"
if [ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ]; then
  extras="dev,forwarder"
fi
want="$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')-$extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing dht and its dependencies into $VENV ..." >&2
  # Build-backend chatter goes to a log, shown only when the install fails.
  log="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip &&
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "installing into $VENV failed (log above, also in $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
PATH="$(cd "$VENV/bin" && pwd):$PATH"
export PATH
