# syntax=docker/dockerfile:1
# realtime-reset-proxy: the proxy, ready to run as a sidecar.
#
#   docker build -t realtime-reset-proxy .
#   docker run --rm -p 8765:8765 realtime-reset-proxy
#   docker run --rm -p 8765:8765 -v "$PWD/config.toml:/etc/realtime-reset-proxy/config.toml:ro" realtime-reset-proxy
#   docker stop -t 40 <container>        # longer than [listen] drain_seconds, see STOPSIGNAL below
#
# examples/ has a docker-compose file and a Kubernetes Deployment running it beside an app.
#
# Two stages: the builder makes wheels (the project's and every dependency's); the final image installs them
# into a venv with no index, no source tree and no compiler, and runs as a non-root user.

# --- builder ------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/

# aiohttp, orjson, websockets, yarl, ... publish binary wheels for CPython 3.11 on amd64 and arm64. On a
# platform without them pip falls back to building from source, which needs a compiler: install
# build-essential in THIS stage only, never in the final one.
RUN pip wheel --wheel-dir /wheels .

# The example config binds 127.0.0.1 (right for a sidecar on a host), which a published container port cannot
# reach: the image's copy listens on 0.0.0.0. The grep fails the build should the example's line ever change.
COPY config.example.toml ./
RUN sed 's/^host = "127\.0\.0\.1"$/host = "0.0.0.0"/' config.example.toml > /config.toml \
    && grep -qx 'host = "0.0.0.0"' /config.toml

# --- final --------------------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy

# The wheels are bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --find-links=/wheels \
        realtime-reset-proxy

# Replace it with your own: -v ./config.toml:/etc/realtime-reset-proxy/config.toml:ro (keep host = "0.0.0.0"),
# or mount it elsewhere and pass `--config /that/path` as the command.
COPY --from=builder /config.toml /etc/realtime-reset-proxy/config.toml

USER 10001:10001
EXPOSE 8765

# On SIGTERM the proxy drains: /readyz turns 503, new sessions get 503, open sessions get `[listen] drain_seconds`
# (default 30) to end on their own, then the rest are closed with 1001 and it exits 0. The engine's grace period
# must outlast the drain or SIGKILL cuts the calls: `docker stop -t 40`, compose `stop_grace_period: 40s`,
# Kubernetes `terminationGracePeriodSeconds: 45` (docker's default is 10 s). A second SIGTERM/SIGINT ends the
# drain at once.
STOPSIGNAL SIGTERM

# /healthz answers 200 while the process serves (draining included, so a drain is not "unhealthy"); python
# instead of curl, which the slim base does not have. urlopen raises on a refused connection or a non-2xx.
# The URL must match the config: 8765 is `[listen] port` of the config above. With `[admin] port` set, use that
# port; with TLS on, https:// (and a context that trusts the certificate). Change this line with them.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=2)"]

ENTRYPOINT ["realtime-reset-proxy"]
CMD ["--config", "/etc/realtime-reset-proxy/config.toml"]
