#!/usr/bin/env bash
# One command down: `scripts/down.sh local` removes the local stack's containers, networks and
# volumes and its generated secrets, then checks that nothing of it is left. Safe to run when
# the stack is (partly) down already.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
case ${1:-} in
  local)
    t0=$SECONDS
    bash "$root/deploy/local/stack.sh" down
    bash "$root/deploy/local/stack.sh" clean
    bash "$root/deploy/local/stack.sh" check-clean
    echo "down.sh: the local stack is gone ($((SECONDS - t0)) s)" >&2
    ;;
  aws)
    t0=$SECONDS
    bash "$root/deploy/aws/stack.sh" down
    echo "down.sh: aws is down ($((SECONDS - t0)) s)" >&2
    ;;
  gcp | azure)
    echo "down.sh: the $1 environment is not implemented yet (its issue adds it); 'local' and 'aws' are" >&2
    exit 2 ;;
  *)
    echo "usage: scripts/down.sh local    (environments: local, aws; gcp, azure to come)" >&2
    exit 2 ;;
esac
