#!/bin/sh
# Build a Debian bookworm base image from Debian packages alone, for hosts that cannot pull
# from an image registry (it stands in for debian:bookworm-slim):
#
#   docker/base/build-base.sh [IMAGE]        # default mome-debian:bookworm
#
# Needs root, mmdebstrap (apt-get install mmdebstrap), a reachable Debian mirror
# ($DEBIAN_MIRROR, default http://deb.debian.org/debian) and DOCKER_HOST set as for `docker`.
set -eu

IMAGE=${1:-mome-debian:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DOCKER=${DOCKER:-docker}

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/mome-base.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

# The merged /usr set up by mmdebstrap's hook rather than by the usrmerge package (which
# would bring perl, 50 MB, into the image).
hooks=
[ -d /usr/share/mmdebstrap/hooks/merged-usr ] && hooks=--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr

# minbase: dpkg, apt and the Essential set. Docs, man pages and locales are left out (as in
# the -slim images); the dpkg filter stays in the image, so later `apt-get install`s skip them too.
# shellcheck disable=SC2086
mmdebstrap --variant=minbase $hooks \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  bookworm "$tmp/rootfs.tar" \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY bookworm-security main"

"$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["bash"]' \
  "$tmp/rootfs.tar" "$IMAGE" >/dev/null
echo "$IMAGE"
