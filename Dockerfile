# syntax=docker/dockerfile:1
# memplugd in a container: the daemon, the `memplug` CLI (for HEALTHCHECK and
# exec probes) and nothing else. Clients reach it through the socket directory,
# a volume shared with them (sidecar) or a host directory (DaemonSet).
#
#   podman build --format docker --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t memplug .
#   podman run -d -v /run/memplug:/run/memplug memplug
#
# BASE is any Debian-like image with Python >= 3.11 and its venv module:
# python:3.11-slim (python in /usr/local) or a plain Debian bookworm with
# python3-venv (python in /usr). Both stages must use the same BASE: the venv
# links to the base's interpreter.
ARG BASE=python:3.11-slim

FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/memplug
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY common ./common
COPY daemon ./daemon
COPY client ./client
# Behind a TLS-intercepting proxy, pass the CA bundle that signs its
# certificates as the build secret "ca"; without it pip uses its own bundle.
RUN --mount=type=secret,id=ca,required=false \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/memplug/bin/pip install --no-cache-dir . \
    && /opt/memplug/bin/memplugd --version

FROM ${BASE}
# A "memplug" user (uid/gid 10001) for running without root; see below.
RUN groupadd --system --gid 10001 memplug \
    && useradd --system --uid 10001 --gid memplug --no-create-home \
        --home-dir /var/lib/memplug --shell /usr/sbin/nologin memplug \
    && install -d -m 0755 -o memplug -g memplug /run/memplug \
    && install -d -m 0700 -o memplug -g memplug /var/lib/memplug
COPY --from=builder /opt/memplug /opt/memplug
ENV PATH=/opt/memplug/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MEMPLUG_SOCKET=/run/memplug/memplug.sock
# The user stays root (the base image's default) on purpose. Out of the box
# the socket volume is a root-owned host directory, regions default to owner
# uid 0, and hugetlb pools are root-owned sysfs files: as any other user each
# needs a capability that a container user only gets when it is added by hand.
# Run unprivileged with
#   --user memplug --cap-add CHOWN --cap-add DAC_OVERRIDE [--cap-add IPC_LOCK]
# (CHOWN: give memfds to their region's owner; DAC_OVERRIDE: read-only
# attaches and a root-owned socket directory; IPC_LOCK: locked memory).
# tests/e2e/test_container.py runs the image both ways.
VOLUME ["/run/memplug"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["memplug", "--socket", "/run/memplug/memplug.sock", "health"]
ENTRYPOINT ["memplugd"]
CMD ["--socket", "/run/memplug/memplug.sock", "--fd-socket", "/run/memplug/fd.sock", \
     "--state-dir", "/var/lib/memplug"]
