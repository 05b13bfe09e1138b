# Builds the four service binaries into one small image; compose.yaml picks
# the binary per service.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/order-svc /src/target/release/payment-svc \
     /src/target/release/inventory-svc /src/target/release/notification-svc /usr/local/bin/
ENV LOG_FORMAT=json
