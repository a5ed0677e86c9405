# echo-server and echo-loadgen in one small image.
#
#   docker build -t echo-server .
#   docker run --rm -p 8080:8080 -p 1883:1883 -p 9090:9090 echo-server
#
# Build stage: dependencies are compiled in their own layer (from the
# manifests and the lock file only), so a change in our code rebuilds only
# our crates.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crates/echo-server/Cargo.toml crates/echo-server/Cargo.toml
COPY crates/echo-loadgen/Cargo.toml crates/echo-loadgen/Cargo.toml
# Workspace members too: the load generator's MQTT codec, and the test
# harness (not built into the image).
COPY crates/echo-mqtt-wire/Cargo.toml crates/echo-mqtt-wire/Cargo.toml
COPY crates/echo-testkit/Cargo.toml crates/echo-testkit/Cargo.toml
# The threads-vs-loop peers are a workspace member: cargo needs their
# manifest, and files for their targets, to load the workspace. They are not
# built into the image.
COPY loadtest/peers/rust/Cargo.toml loadtest/peers/rust/Cargo.toml
# The patched rumqttd ([patch.crates-io] in Cargo.toml) is a dependency too.
COPY vendor vendor
# Placeholder sources with the same targets as ours: enough for cargo to
# compile every dependency.
RUN set -eux; for crate in crates/*/ loadtest/peers/rust/; do \
      mkdir -p "$crate/src/bin"; echo 'fn main() {}' > "$crate/src/main.rs"; touch "$crate/src/lib.rs"; \
    done; \
    for bin in threaded tokio_mt; do echo 'fn main() {}' > "loadtest/peers/rust/src/bin/$bin.rs"; done; \
    cargo build --release --locked -p echo-server -p echo-loadgen; \
    rm -rf crates/*/src target/release/deps/*echo_server* target/release/deps/*echo_loadgen* \
      target/release/deps/*echo_mqtt_wire* \
      target/release/.fingerprint/echo-* target/release/echo-*
COPY crates crates
RUN cargo build --release --locked -p echo-server -p echo-loadgen --bins \
    && strip --strip-debug target/release/echo-server target/release/echo-loadgen

# Runtime stage: the binaries, the documented default configuration, no shell tools needed.
FROM debian:bookworm-slim
RUN useradd --uid 10001 --user-group --no-create-home --no-log-init --shell /usr/sbin/nologin echo \
    && install -d -o echo -g echo /var/lib/echo-server
# Where MQTT persistence can write (ECHO_MQTT_PERSISTENCE=true,
# ECHO_MQTT_PERSISTENCE_FILE=/var/lib/echo-server/mqtt.db); a named volume
# mounted there starts owned by the server's user.
VOLUME /var/lib/echo-server
COPY --from=build /src/target/release/echo-server /src/target/release/echo-loadgen /usr/local/bin/
COPY config/server.toml /etc/echo-server/server.toml
# The server reads this file at start; mount your own over it to configure
# the container, or override single keys with ECHO_<SECTION>_<KEY> variables.
# One process is one event loop on one core: `docker run -e
# ECHO_SERVER_WORKERS=auto` runs one worker per CPU the container is given.
ENV ECHO_CONFIG=/etc/echo-server/server.toml
# By number, so that orchestrators can verify it is not root (runAsNonRoot).
USER 10001:10001
# WebSocket (and MQTT over WebSocket), MQTT, admin (/healthz /readyz /metrics)
EXPOSE 8080 1883 9090
# SIGTERM starts the graceful shutdown (close 1001 to every client, 5 s grace),
# well inside the 10 s `docker stop` waits before SIGKILL.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["echo-server", "healthcheck"]
CMD ["echo-server"]
