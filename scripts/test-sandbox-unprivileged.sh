#!/usr/bin/env bash
# The notebook sandbox as an unprivileged Marina makes it (pasta outside, bwrap inside, a user
# namespace of the sandbox's own): runs the sandbox tests (runtime/tests/sandbox.rs, real Marimo
# and Sail) as an unprivileged user. `cargo test` runs them as whoever runs it, which in CI is
# root, and root takes the other path (bwrap outside, pasta joining, setpriv).
#
# Needs root to set up: it creates the system user `marina-sbx-test`, a notebook environment
# that user can read (from Debian's /usr/bin/python3, in /var/tmp/marina-sbx-venv: the test
# venv's interpreter may live under root's home), and opens /dev/net/tun to every user for the
# run (mode 0666, what most distributions set; the mode is restored afterwards).
#   scripts/test-sandbox-unprivileged.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "$(id -u)" != 0 ]; then
  echo "not root: this machine's own user is unprivileged, and cargo test already ran the sandbox tests as it"
  exit 0
fi
user=marina-sbx-test
id "$user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
venv=/var/tmp/marina-sbx-venv
req=runtime/python-requirements.txt
if ! cmp -s "$venv/.marina-requirements" "$req" 2>/dev/null; then
  echo "creating $venv (the pinned notebook packages, for user $user)"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check --progress-bar off -q -r "$req"
  cp "$req" "$venv/.marina-requirements"
fi
bin=$(cargo test -p marina-runtime --test sandbox --no-run 2>&1 | grep -o 'target/debug/deps/sandbox-[0-9a-f]*' | tail -1)
[ -x "$bin" ] || { echo "error: no sandbox test binary" >&2; exit 1; }
work=$(mktemp -d /var/tmp/marina-sbx-test.XXXXXX)
cp "$bin" "$work/sandbox-tests"
chmod 755 "$work/sandbox-tests"; chown "$user" "$work"
tun_mode=$(stat -c %a /dev/net/tun)
cleanup() { chmod "$tun_mode" /dev/net/tun; rm -rf "$work"; }
trap cleanup EXIT
chmod 0666 /dev/net/tun
echo "running the sandbox tests as $user (uid $(id -u "$user"))"
# setpriv, not su: no login shell for a system user, and no PAM session.
cd "$work"
setpriv --reuid="$user" --regid="$user" --init-groups -- \
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work" TMPDIR="$work" NOTEBOOK_VENV="$venv" \
  "$work/sandbox-tests" --test-threads 1
