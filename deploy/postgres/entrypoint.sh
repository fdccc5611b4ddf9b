#!/bin/sh
# ember-postgres entrypoint: creates the cluster on the first start (in the data volume), then
# runs PostgreSQL 15 in the foreground. SIGINT (the image's stop signal) is a fast shutdown.
set -eu
BIN=/usr/lib/postgresql/15/bin
: "${PGDATA:?PGDATA is not set}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ ! -r "$POSTGRES_PASSWORD_FILE" ]; then
    echo "ember-postgres: cannot read the password file $POSTGRES_PASSWORD_FILE: mount it (owned by uid 10999, mode 0600)" >&2
    exit 1
  fi
  "$BIN/initdb" -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$POSTGRES_PASSWORD_FILE" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  # Password authentication from the container network (initdb allows only loopback).
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
  if [ "$POSTGRES_DB" != postgres ]; then
    echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" |
      "$BIN/postgres" --single -D "$PGDATA" -j postgres >/dev/null
  fi
  echo "ember-postgres: created the cluster in $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql "$@"
