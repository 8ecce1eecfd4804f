#!/usr/bin/env bash
# Start the cluster of cluster/launcher.yaml with Ray's token authentication: the token is
# generated once on this machine (~/.ray/auth_token; kept if it exists), copied to every node
# by the launcher, and read by cluster/submit.sh. Extra arguments go to `ray up`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -s "$HOME/.ray/auth_token" ]; then
    ray get-auth-token --generate > /dev/null
fi
test -s "$HOME/.ray/auth_token" || { echo "no token at ~/.ray/auth_token" >&2; exit 1; }
exec ray up "$here/launcher.yaml" "$@"
