# The workerbundle controller/CLI image. The images workerbundle builds need no Docker; this file is
# for publishing workerbundle itself with any OCI builder (docker build, buildah, kaniko).
FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src src
# A workspace member: cargo needs its manifest even though the binary does not use it.
COPY crates crates
COPY base-images base-images
COPY examples examples
RUN cargo build --release --locked --bin workerbundle

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/workerbundle /usr/local/bin/workerbundle
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/workerbundle"]
