# The CodeScaler Serve image: codescaler-serve in a virtual environment on a slim Python base,
# run as a non-root user, configured only by CODESCALER_* environment variables.
#
# GPU (default; torch from PyPI is the CUDA build, the host needs the NVIDIA container toolkit):
#   docker build -t codescaler-serve .
# CPU only (much smaller):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t codescaler-serve:cpu .
# Offline torch: a folder of wheels as the build context named "wheels", e.g.
#   docker build --build-context wheels=/opt/wheels --build-arg TORCH_REQUIREMENT=torch==2.13.0+cpu ...
# Extra certificate authorities for pip (a full PEM bundle; mounted for the pip steps only,
# never stored in a layer):
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
# Needs BuildKit (the default builder since Docker 23) or podman/buildah.

ARG BASE_IMAGE=python:3.11-slim

# Empty unless replaced with --build-context wheels=DIR; pip looks here before any index.
FROM scratch AS wheels

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/wheels
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: the largest download, and it changes least often.
ARG TORCH_REQUIREMENT=torch
ARG TORCH_INDEX_URL=
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_REQUIREMENT"

# The project's other dependencies, read from pyproject.toml so code changes do not reinstall them.
WORKDIR /src
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt && \
    pip install -r /tmp/requirements.txt

COPY README.md ./
COPY service ./service
COPY models ./models
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install --no-deps . && pip check

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
# A fixed uid so that a host directory mounted at /cache can be chowned to it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/codescaler codescaler \
    && mkdir -p /cache && chown codescaler:codescaler /cache

# Everything written at run time goes to /cache (model downloads and the tiny model), so the root
# file system can be read-only (docker run --read-only --tmpfs /tmp ...).
# Expandable segments: prefix states of every length and batches of every shape come and go on
# the GPU; without them the caching allocator can fragment, and an allocation fail while the
# memory it needs is free in pieces.
ENV PATH=/opt/venv/bin:$PATH \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CODESCALER_MODEL_CACHE_DIR=/cache/codescaler-serve \
    CODESCALER_HOST=0.0.0.0 \
    CODESCALER_PORT=8000
VOLUME /cache
USER codescaler
WORKDIR /home/codescaler
EXPOSE 8000

# /ready is 200 only once the model is loaded and warm and its thread is healthy; the long start
# period covers a first download of the weights.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10m --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('CODESCALER_PORT', '8000'), timeout=4)" || exit 1

ENTRYPOINT ["codescaler-serve"]
