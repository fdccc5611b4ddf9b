#!/usr/bin/env bash
# One command up: `scripts/up.sh local` builds the missing images, creates the PKI and secrets,
# starts the stack (deploy/compose.yaml) and waits until it is healthy; it prints the dashboard
# URL and the path of a read-token file. Running it again changes nothing that is up already.
# Environment settings: deploy/local/stack.sh. Undo with `scripts/down.sh local`.
# `scripts/up.sh gcp|azure`: deploy/cloud/<cloud>.sh up: prerequisite checks (CLI login, project or
# subscription, APIs or resource providers), terraform apply of terraform/<cloud>, the PKI and
# Secrets, images pushed, kubectl apply of deploy/k8s/overlays/<cloud>; prints the dashboard URL
# and the agent profile (docs/deploy-gcp.md, docs/deploy-azure.md).
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
    t0=$SECONDS
    bash "$root/deploy/cloud/$1.sh" up
    echo "up.sh: $1 finished ($((SECONDS - t0)) s)" >&2
    ;;
  *)
    echo "usage: scripts/up.sh local|aws|gcp|azure" >&2
    exit 2 ;;
esac
