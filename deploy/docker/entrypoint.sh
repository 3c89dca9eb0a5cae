#!/bin/sh
# Serve the Tessera model repository at $TESSERA_REPO on all interfaces, on Triton's usual ports (HTTP 8000,
# gRPC 8001, metrics 8002), with the server's log streamed to stdout (`kubectl logs`). Extra arguments go to
# the serve command: $TESSERA_SERVE, `tessera serve` by default (the GPU image sets its own, same flags).
set -eu
repo="${TESSERA_REPO:-/models/repo}"
log="${TESSERA_LOG:-/tmp/tritonserver.log}"
: > "$log"
tail -n +1 -F "$log" 2>/dev/null &
# exec: the serve command is the container's main process and gets SIGTERM (it stops tritonserver cleanly).
# shellcheck disable=SC2086  # TESSERA_SERVE may hold a command and its arguments
exec ${TESSERA_SERVE:-tessera serve} --repo "$repo" --address 0.0.0.0 \
    --http-port 8000 --grpc-port 8001 --metrics-port 8002 \
    --log "$log" --ready-timeout "${TESSERA_READY_TIMEOUT:-1800}" "$@"
