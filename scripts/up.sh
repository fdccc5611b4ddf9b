#!/usr/bin/env bash
# One command up: `scripts/up.sh local` builds the missing images, creates the PKI and secrets,
# starts the stack (deploy/compose.yaml) and waits until it is healthy; it prints the dashboard
# URL and the path of a read-token file. Running it again changes nothing that is up already.
# Environment settings: deploy/local/stack.sh. Undo with `scripts/down.sh local`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
case ${1:-} in
  local)
    t0=$SECONDS
    bash "$root/deploy/local/stack.sh" up
    echo "up.sh: the local stack is up ($((SECONDS - t0)) s)" >&2
    ;;
  aws)
    t0=$SECONDS
    bash "$root/deploy/aws/stack.sh" up
    echo "up.sh: aws is up ($((SECONDS - t0)) s)" >&2
    ;;
  gcp | azure)
    echo "up.sh: the $1 environment is not implemented yet (its issue adds it); 'local' and 'aws' are" >&2
    exit 2 ;;
  *)
    echo "usage: scripts/up.sh local    (environments: local, aws; gcp, azure to come)" >&2
    exit 2 ;;
esac
