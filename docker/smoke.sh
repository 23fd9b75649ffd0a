#!/usr/bin/env bash
# Container smoke test: build the image with the CPU build of torch, run it (read-only root file
# system) with the tiny random model, wait for /ready, check the HEALTHCHECK, score one pair,
# stop it. Too slow for every CI run (a few minutes); run it before changing the Dockerfile lands.
#
#   docker/smoke.sh
#
# Engine: docker when a Docker engine answers; otherwise podman, prepared by
# ../shared/tools/container-runtime.sh when that script exists (it installs podman and builds a
# local Python base image for machines that reach no image registry).
# Knobs (environment):
#   BASE_IMAGE         base image (default python:3.11-slim; localhost/python-base:3.11-bookworm
#                      when podman has it, i.e. after container-runtime.sh)
#   TORCH_REQUIREMENT  torch requirement (default: the CPU wheel found in WHEELS_DIR, else "torch")
#   TORCH_INDEX_URL    index of the torch wheel (default the CPU index, unless WHEELS_DIR has one)
#   WHEELS_DIR         folder of wheels for the build context "wheels" (default: PIP_FIND_LINKS
#                      when it is a folder holding a CPU torch wheel)
#   PIP_CA_FILE        CA bundle for pip inside the build, passed as the build secret pip_ca
#                      (default PIP_CERT, else SSL_CERT_FILE, when set)
#   IMAGE              image tag (default codescaler-serve:smoke)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
image=${IMAGE:-codescaler-serve:smoke}
name=codescaler-smoke-$$
log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --- engine ------------------------------------------------------------------
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
  export DOCKER_BUILDKIT=1
else
  runtime_script="$repo/../shared/tools/container-runtime.sh"
  if [ -f "$runtime_script" ]; then
    log "no Docker engine answers; preparing podman with $runtime_script"
    bash "$runtime_script"
  fi
  command -v podman >/dev/null || { log "neither a Docker engine nor podman is available"; exit 1; }
  engine=podman
fi
log "engine: $engine"

# --- build arguments -----------------------------------------------------------
base_image=${BASE_IMAGE:-python:3.11-slim}
if [ -z "${BASE_IMAGE:-}" ] && [ "$engine" = podman ] && podman image exists localhost/python-base:3.11-bookworm; then
  base_image=localhost/python-base:3.11-bookworm
fi
wheels_dir=${WHEELS_DIR:-}
if [ -z "$wheels_dir" ] && [ -d "${PIP_FIND_LINKS:-}" ] && compgen -G "$PIP_FIND_LINKS/torch-*+cpu-*.whl" >/dev/null; then
  wheels_dir=$PIP_FIND_LINKS
fi
torch_requirement=${TORCH_REQUIREMENT:-torch}
torch_index_url=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
if [ -n "$wheels_dir" ]; then
  wheel=$(compgen -G "$wheels_dir/torch-*+cpu-*.whl" | sort -V | tail -n 1 || true)
  if [ -n "$wheel" ] && [ -z "${TORCH_REQUIREMENT:-}" ]; then
    version=$(basename "$wheel" | cut -d- -f2)   # e.g. 2.13.0+cpu
    torch_requirement="torch==$version"
    torch_index_url=${TORCH_INDEX_URL-}          # the wheel needs no torch index
  fi
fi
ca_file=${PIP_CA_FILE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}

build=("$engine" build -t "$image" -f "$repo/Dockerfile"
       --build-arg "BASE_IMAGE=$base_image"
       --build-arg "TORCH_REQUIREMENT=$torch_requirement"
       --build-arg "TORCH_INDEX_URL=$torch_index_url")
[ -n "$wheels_dir" ] && build+=(--build-context "wheels=$wheels_dir")
[ -n "$ca_file" ] && [ -f "$ca_file" ] && build+=(--secret "id=pip_ca,src=$ca_file")
# podman: docker format keeps HEALTHCHECK (OCI images have none); host network as the runtime
# script sets it up.
[ "$engine" = podman ] && build+=(--format docker --network host)

log "building $image: base $base_image, $torch_requirement${torch_index_url:+ from $torch_index_url}${wheels_dir:+, wheels from $wheels_dir}"
started=$(date +%s)
"${build[@]}" "$repo"
log "built in $(( $(date +%s) - started )) s; size $("$engine" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
if [ -n "$ca_file" ] && "$engine" run --rm --entrypoint sh "$image" -c 'test -e /run/secrets/pip_ca'; then
  log "FAIL: the CA secret was left in the image"; exit 1
fi
[ -n "$ca_file" ] && log "the CA secret is not in the image"

# --- run -----------------------------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run=("$engine" run -d --name "$name" --read-only --tmpfs /tmp
     -e CODESCALER_MODEL=tiny-random -e CODESCALER_DEVICE=cpu -e HF_HUB_OFFLINE=1)
if [ "$engine" = podman ]; then
  # Without systemd, podman logs "unable to get systemd connection" for its periodic health
  # timer (harmless); the check itself is run below with podman healthcheck run.
  run+=(--network host -e "CODESCALER_PORT=$port")
else
  run+=(-p "127.0.0.1:$port:8000")
fi
cleanup() { "$engine" rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"${run[@]}" "$image" >/dev/null
url=http://127.0.0.1:$port
log "started $name on $url; waiting for /ready"

deadline=$(( $(date +%s) + 300 ))
until curl -fsS "$url/ready" >/dev/null 2>&1; do
  if [ "$("$engine" inspect --format '{{.State.Running}}' "$name")" != true ] || [ "$(date +%s)" -gt "$deadline" ]; then
    log "FAIL: not ready; container log:"; "$engine" logs "$name" 2>&1 | tail -n 40; exit 1
  fi
  sleep 1
done
log "ready: $(curl -fsS "$url/ready")"

if [ "$engine" = podman ]; then
  podman healthcheck run "$name" && log "healthcheck: healthy"
else
  for _ in $(seq 60); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$name")
    [ "$health" = healthy ] && break
    sleep 1
  done
  [ "$health" = healthy ] || { log "FAIL: health status $health"; exit 1; }
  log "healthcheck: healthy"
fi
log "user: $("$engine" exec "$name" id -un), HF_HOME=$("$engine" exec "$name" printenv HF_HOME)"

body='{"items": [{"problem": "Print the sum of two integers read from one line.",
  "response": "Read both numbers and add them.\n\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"}]}'
reply=$(curl -fsS -H 'content-type: application/json' -d "$body" "$url/v1/score")
log "scored: $reply"
python3 - "$reply" <<'EOF'
import json, sys
result = json.loads(sys.argv[1])["results"][0]
assert result["valid"] and result["extraction"]["status"] == "ok" and result["reward"] > 0, result
EOF

"$engine" stop -t 30 "$name" >/dev/null
log "stopped: exit code $("$engine" inspect --format '{{.State.ExitCode}}' "$name"); last log lines:"
"$engine" logs "$name" 2>&1 | tail -n 5
log "PASS"
