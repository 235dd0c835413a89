# syntax=docker/dockerfile:1
#
# zerodrop in a container: built on the official Rust image, run on Debian slim as an
# unprivileged user. Build and run (see docs/deployment.md):
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse --short HEAD)" -t zerodrop .
#   docker run -d --name zerodrop -p 7700:7700 -v zerodrop-data:/var/lib/zerodrop \
#     --stop-timeout 45 zerodrop
#
# --stop-timeout must exceed the drain grace (ZERODROP_DRAIN_GRACE_SEC, 30 s by default):
# Docker's default of 10 s would SIGKILL a drain halfway.

# ---------------------------------------------------------------------------------- builder
FROM rust:1.90-bookworm AS builder
WORKDIR /src
# Only what the build reads: the workspace manifests, the lock file, the crates and the
# shipped SLO file (compiled into the operator tools).
COPY Cargo.toml Cargo.lock slo.json ./
COPY crates ./crates
# Optional: the commit shown as zerodrop_build_info{commit=…}.
ARG GIT_COMMIT=""
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    ZERODROP_GIT_COMMIT="${GIT_COMMIT}" cargo build --release --locked -p zerodrop \
    && cp target/release/zerodrop /usr/local/bin/zerodrop

# ---------------------------------------------------------------------------------- runtime
FROM debian:bookworm-slim
# A fixed uid/gid, so volume ownership and `runAsUser` policies can name it.
RUN groupadd --system --gid 10001 zerodrop \
    && useradd --system --uid 10001 --gid zerodrop --no-create-home \
       --home-dir /var/lib/zerodrop --shell /usr/sbin/nologin zerodrop \
    && install -d -m 0700 -o zerodrop -g zerodrop /var/lib/zerodrop
COPY --from=builder /usr/local/bin/zerodrop /usr/local/bin/zerodrop
COPY deploy/zerodrop.toml /etc/zerodrop/zerodrop.toml

# Listen on every interface inside the container; the data dir is the volume. Settings can
# be overridden with more -e ZERODROP_* variables or a mounted config file
# (ZERODROP_CONFIG=/etc/zerodrop/zerodrop.toml; these variables still win over it).
ENV ZERODROP_LISTEN=0.0.0.0:7700 \
    ZERODROP_DATA_DIR=/var/lib/zerodrop \
    ZERODROP_LOG_FORMAT=json
VOLUME /var/lib/zerodrop
EXPOSE 7700
USER 10001:10001

# Liveness, not readiness: /health/ready turns 503 during a store outage or a drain, and an
# orchestrator that restarts "unhealthy" containers would then kill instances whose clients
# are fine. Load balancers should check /health/ready themselves. The check is the binary
# itself (plain HTTP to 127.0.0.1 at ZERODROP_LISTEN's port): the image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["zerodrop", "healthcheck"]

# SIGTERM drains (clients get a reconnect frame with a fresh resume token), then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["zerodrop"]
CMD ["serve"]
