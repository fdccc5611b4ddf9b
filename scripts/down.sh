#!/usr/bin/env bash
# One command down: `scripts/down.sh local` removes the local stack's containers, networks and
# volumes and its generated secrets, then checks that nothing of it is left. Safe to run when
# the stack is (partly) down already.
# `scripts/down.sh gcp|azure`: deploy/cloud/<cloud>.sh down: empties the buckets Terraform would
# refuse to delete, terraform destroy, removes the local state; a no-op when nothing is up.
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
    t0=$SECONDS
    bash "$root/deploy/cloud/$1.sh" down
    echo "down.sh: $1 finished ($((SECONDS - t0)) s)" >&2
    ;;
  *)
    echo "usage: scripts/down.sh local|aws|gcp|azure" >&2
    exit 2 ;;
esac
