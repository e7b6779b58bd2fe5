# The workerbundle controller/CLI image. The images workerbundle builds need no Docker, nor does its
# own (`workerbundle self-image`); this file is for those who build with Docker (docker build,
# buildah, kaniko).
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
# The build links liblzma dynamically when its headers are there (they are in rust:*-bookworm), and
# distroless/cc lacks it: bring the library (same Debian release) along.
COPY --from=build /lib/x86_64-linux-gnu/liblzma.so.5* /lib/x86_64-linux-gnu/
USER 65532:65532
# The same entrypoint as `workerbundle self-image` gives its image: deploy/controller.yaml's args
# are the flags of `run`.
ENTRYPOINT ["/usr/local/bin/workerbundle", "run"]
