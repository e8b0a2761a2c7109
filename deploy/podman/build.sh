#!/usr/bin/env bash
# Build the CPU image (deploy/docker/Dockerfile) with Debian's podman on a machine that reaches no
# image registry, then run the stack from it once and stream a clip through it.
#
#   sudo bash deploy/podman/build.sh            # as root: podman with runc (see below)
#
# The base image is made here: debootstrap (Debian 12 + python3.11 from Debian's packages) and
# `podman import`. torch comes from $WHEELS when it holds a CPU wheel (this project's machines
# have one in /opt/wheels), else from PyTorch's CPU index. What ran, and how long it took, is in
# docs/deploy.md ("The CPU image, built here").
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/var/tmp/midasheng-podman}
WHEELS=${WHEELS:-/opt/wheels}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE=localhost/midasheng-base:bookworm
IMAGE=localhost/midasheng-live:cpu
mkdir -p "$WORK"
# podman as root on these machines: crun fails ("cgroups in hybrid mode not supported"), runc
# works once the default ulimits are dropped.
printf '[containers]\ndefault_ulimits = []\n' > "$WORK/containers.conf"
export CONTAINERS_CONF="$WORK/containers.conf"
podman() { command podman --runtime runc "$@"; }

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "base image"
if ! podman image exists "$BASE"; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
  cat >"$WORK/rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE"
fi

step "image"
args=(--format docker --build-arg "BASE=$BASE" --network host -f deploy/docker/Dockerfile -t "$IMAGE")
if compgen -G "$WHEELS/torch-*+cpu-*.whl" >/dev/null; then
  args+=(-v "$WHEELS:/wheels:ro" --build-arg WHEELS=/wheels --build-arg TORCH_INDEX=https://pypi.org/simple)
fi
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then  # the host's CAs (a TLS-intercepting proxy's too)
  args+=(-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro --build-arg CA_BUNDLE=/host-ca.crt)
fi
podman build "${args[@]}" .
podman image inspect "$IMAGE" --format 'size: {{.Size}} bytes, user: {{.Config.User}}, entrypoint: {{.Config.Entrypoint}}'

step "run: midasheng up in the container"
name=midasheng-smoke-$$
port=${PORT:-50151}
podman run -d --rm --name "$name" --network host -e "MIDASHENG_HEALTH_TARGET=127.0.0.1:$port" \
  "$IMAGE" up --host 127.0.0.1 --port "$port" --http-port 0 >/dev/null
trap 'podman stop -t 20 "$name" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 120); do
  if podman exec "$name" python -m services.cli.health "127.0.0.1:$port" --timeout 1 >/dev/null 2>&1; then break; fi
  sleep 1
done
podman exec "$name" python -m services.cli.health "127.0.0.1:$port" --service gateway
podman exec "$name" id
podman healthcheck run "$name" && echo "HEALTHCHECK (the image's own): healthy"

step "stream a clip through the container's stack"
podman exec "$name" python -c "
import numpy as np, soundfile as sf
from services.training.synth import render_sound
rng = np.random.default_rng(0)
sf.write('/tmp/clip.wav', np.concatenate([render_sound('high_tone', rng, 160000), render_sound('white_noise', rng, 160000)]), 16000)
"
podman exec "$name" midasheng stream /tmp/clip.wav --server "127.0.0.1:$port"
step "done"
