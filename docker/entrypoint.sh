#!/bin/sh
# The image's entry point.
#   serve | worker ...   check the configuration, create the shared store once (several
#                        containers may start at the same moment on the same volume), then
#                        run `mome serve|worker ...`
#   other mome commands  (model, facts, chat, eval, router) run as `mome ...`
#   anything else        runs as given (sh, python, ...)
set -eu
[ "$#" -gt 0 ] || set -- serve

case "$1" in
  serve|worker)
    if [ "${MOME_MEMORY:-true}" != "false" ] && [ -z "${MOME_ADMIN_KEY:-}" ]; then
      echo "mome: MOME_ADMIN_KEY is not set. Every replica and the worker must share one admin" \
           "key: set MOME_ADMIN_KEY (at least 8 characters) in the environment." >&2
      exit 2
    fi
    if [ "${MOME_MEMORY:-true}" != "false" ]; then
      python /usr/local/lib/mome/init_store.py
    fi
    exec mome "$@"
    ;;
  model|facts|chat|eval|router|-h|--help)
    exec mome "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
