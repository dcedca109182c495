#!/bin/bash
# Healthy when HAProxy answers its monitor URI with 200 (at least one replica is up).
# Plain bash (/dev/tcp): the image carries no HTTP client.
exec 3<>/dev/tcp/127.0.0.1/8080 || exit 1
printf 'GET /proxy-health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 5 status <&3 || exit 1
case "$status" in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) exit 1 ;;
esac
