#!/usr/bin/env bash
# The project's test command.
#
# Tests start their own throwaway redis-server on a free port (see tests/src/server.rs), so all
# this needs is a redis-server binary; it never uses or touches a server on 127.0.0.1:6379.
#
#   ./scripts/test.sh                 # every test target, then the doctests
#   ./scripts/test.sh -E 'test(restart)'   # extra args go to nextest (or to `cargo test`)
#   ./scripts/test.sh --server-suite  # only the tests that run against a redis-server
#   ./scripts/test.sh --server-suite --without-tls   # ... leaving out the TLS tests
#
# --server-suite runs the packages whose tests start a redis-server (slim-bus-tests, and
# slim-bus-cli, whose tests run the `slim-bus` binary), without doctests: for running the
# suite again on another server version. --without-tls is for a server built without TLS
# support (it exits with "Failed finding TLS support" when given --tls-port).
#
# Env: REDIS_SERVER_BIN=/path/to/redis-server picks the binary the harness runs (a
# valkey-server works too).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

server_suite=0
without_tls=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server-suite) server_suite=1 ;;
    --without-tls) without_tls=1 ;;
    *) break ;;
  esac
  shift
done

die() {
  echo "error: $*" >&2
  exit 1
}

find_redis_server() {
  if [[ -n "${REDIS_SERVER_BIN:-}" ]]; then
    echo "$REDIS_SERVER_BIN"
    return
  fi
  local candidate
  for candidate in "$(command -v redis-server || true)" /usr/bin/redis-server /usr/local/bin/redis-server; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

install_redis_server() {
  echo "==> redis-server not found; installing it with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The package's postinst would start a system redis-server on 6379; tests start their own,
  # so forbid service starts for the duration of the install (only if no policy exists yet).
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    added_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq </dev/null
  apt-get install -y -qq --no-install-recommends redis-server </dev/null >/dev/null
  if [[ "$added_policy" == 1 ]]; then
    rm -f "$policy"
    trap - EXIT
  fi
  # Under systemd the unit was enabled for the next boot; it is not ours to run. Only the unit
  # this install added is disabled, nothing running is stopped.
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable redis-server.service >/dev/null 2>&1 || true
  fi
}

# An explicit choice that is wrong is an error, not a reason to install something else.
if [[ -n "${REDIS_SERVER_BIN:-}" && ! -x "$REDIS_SERVER_BIN" ]]; then
  die "REDIS_SERVER_BIN=$REDIS_SERVER_BIN is not an executable file"
fi
if ! redis_server="$(find_redis_server)"; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    install_redis_server
    redis_server="$(find_redis_server)" || die "apt-get installed redis-server but it is not on PATH"
  else
    die "no redis-server binary found (tests start throwaway servers from it).
  Install one: sudo apt-get install redis-server   (macOS: brew install redis)
  or point REDIS_SERVER_BIN at a redis-server binary."
  fi
fi
# A binary that is there but does not run (a broken install, a wrong architecture, a stub)
# would otherwise fail every test with the same launch error.
if ! redis_version="$("$redis_server" --version 2>&1)" ||
  [[ "$redis_version" != Redis\ server* && "$redis_version" != Valkey\ server* ]]; then
  said="${redis_version%%$'\n'*}"
  die "$redis_server does not run as a redis-server (\`$redis_server --version\` said: ${said:-nothing}).
  Repair or remove it, or point REDIS_SERVER_BIN at a working redis-server (or valkey-server) binary."
fi
export REDIS_SERVER_BIN="$redis_server"
echo "==> using $redis_version ($redis_server)"

if [[ "$server_suite" == 1 ]]; then
  if cargo nextest --version >/dev/null 2>&1; then
    filter=()
    if [[ "$without_tls" == 1 ]]; then
      filter=(-E 'not (binary(tls) | test(/::tls$/))')
    fi
    echo "==> cargo nextest run -p slim-bus-tests -p slim-bus-cli --all-targets ${filter[*]} $*"
    cargo nextest run -p slim-bus-tests -p slim-bus-cli --all-targets "${filter[@]}" "$@"
  else
    targets=(--lib --bins)
    skip=()
    for file in tests/tests/*.rs; do
      name="$(basename "$file" .rs)"
      if [[ "$without_tls" == 1 && "$name" == tls ]]; then
        continue
      fi
      targets+=(--test "$name")
    done
    if [[ "$without_tls" == 1 ]]; then
      skip=(--skip ::tls)
    fi
    echo "==> cargo-nextest not installed; cargo test -p slim-bus-tests ${targets[*]} $* -- ${skip[*]}"
    cargo test -p slim-bus-tests "${targets[@]}" "$@" -- "${skip[@]}"
    echo "==> cargo test -p slim-bus-cli --all-targets $*"
    cargo test -p slim-bus-cli --all-targets "$@"
  fi
  exit 0
fi

if cargo nextest --version >/dev/null 2>&1; then
  echo "==> cargo nextest run --workspace --all-targets $*"
  cargo nextest run --workspace --all-targets "$@"
else
  echo "==> cargo-nextest not installed; cargo test --workspace --all-targets $*"
  cargo test --workspace --all-targets "$@"
fi

# nextest does not run doctests.
echo "==> cargo test --workspace --doc"
cargo test --workspace --doc
