#!/usr/bin/env bash
# Start the servers the tests need, when they are not already running: Redis on 127.0.0.1:6379.
set -euo pipefail
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if ! command -v redis-server >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  mkdir -p /tmp/cascade-test-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/cascade-test-redis --logfile /tmp/cascade-test-redis/redis.log
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
# promtool checks the Prometheus config and alert rules in the tests, and a real Prometheus server scrapes
# a running daemon in tests/test_prometheus.py (both from the Debian package prometheus; it does not start
# a server by itself).
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
