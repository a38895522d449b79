# Shared set-up for scripts/test and scripts/demo (sourced, not run).

# A virtualenv with the package (editable, with the sandbox and postgres extras) and the test, lint
# and typing dependency groups. pip >= 25.1 knows dependency groups; the venv's pip is upgraded
# first because distributions ship older ones.
ensure_venv() {
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
  fi
  local stamp=.venv/.installed-$(cat pyproject.toml | python3 -c 'import hashlib,sys;print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')
  if [[ ! -f $stamp ]]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=25.1"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[sandbox,postgres]" \
      --group test --group lint --group typing
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
}

# ruff (format check, then lint) and mypy (strict, configured in pyproject.toml), in that order;
# each prints its findings and the first that has any stops the calling script (set -e).
run_static_checks() {
  echo "scripts: ruff format --check" >&2
  .venv/bin/ruff format --check --quiet .
  echo "scripts: ruff check" >&2
  .venv/bin/ruff check --quiet .
  echo "scripts: mypy" >&2
  .venv/bin/mypy
}

# PostgreSQL for the ledger tests: TEST_PG_URL if set; else a server on 127.0.0.1:5432; else a
# throwaway cluster from the installed binaries (as the postgres user when run as root), stopped
# when the calling script exits. Without any, the PostgreSQL tests skip loudly (fail under CI).
ensure_postgres() {
  if [[ -n ${TEST_PG_URL:-} ]]; then return; fi
  if pg_answers 127.0.0.1 5432; then
    export TEST_PG_URL=postgresql://postgres@127.0.0.1:5432/postgres
    return
  fi
  local initdb
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
  [[ -z $initdb ]] && initdb=$(command -v initdb || true)
  if [[ -z $initdb ]]; then
    echo "scripts: no PostgreSQL server or binaries found; PostgreSQL tests will skip (fail in CI)" >&2
    return
  fi
  local bin dir port=55432 as=()
  bin=$(dirname "$initdb")
  dir=$(mktemp -d /tmp/catena-pg.XXXXXX)
  if [[ $(id -u) == 0 ]]; then
    chown postgres "$dir"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
  "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start >/dev/null
  PG_THROWAWAY=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop)
  trap 'stop_postgres' EXIT
  export TEST_PG_URL=postgresql://postgres@127.0.0.1:$port/postgres
  echo "scripts: started a throwaway PostgreSQL at 127.0.0.1:$port" >&2
}

stop_postgres() {
  if [[ -n ${PG_THROWAWAY:-} ]]; then "${PG_THROWAWAY[@]}" >/dev/null 2>&1 || true; fi
}

pg_answers() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}
