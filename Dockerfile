# Builds the four service binaries and sagactl into one small image;
# compose.yaml picks the binary per service. It runs as an unprivileged user
# (uid 10001), never root.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl openssl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin saga
COPY --from=build /src/target/release/order-svc /src/target/release/payment-svc \
     /src/target/release/inventory-svc /src/target/release/notification-svc \
     /src/target/release/sagactl /usr/local/bin/
COPY deploy/compose/saga-compose.sh /usr/local/bin/saga-compose
ENV LOG_FORMAT=json
USER 10001
