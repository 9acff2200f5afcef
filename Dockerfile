# The `marina` image: the control plane (`marina control`), the edge (`marina proxy`) and, for trying
# it out, everything in one process (`marina serve`, the default command). Notebook pods run a
# separate image with Python, marimo and pysail (setting runtime.kubernetes.marimo_image).
#   docker build -t marina .
#   docker run --rm -p 8080:8080 -p 8000:8000 -v marina-data:/var/lib/marina marina
# The first `serve` installs the notebook Python environment (about 800 MB) into the volume.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin marina

FROM debian:bookworm-slim
# python3-venv only for `marina serve`'s local runtime; `control` and `proxy` need none of it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/marina --create-home marina
COPY --from=build /src/target/release/marina /usr/local/bin/marina
USER 10001:10001
WORKDIR /var/lib/marina
# A container must listen on all interfaces; the public URLs are what a browser on the host uses.
# Kubernetes manifests set their own values (deploy/kubernetes).
ENV MARINA_DATA_DIR=/var/lib/marina \
    MARINA_CONTROL__LISTEN=0.0.0.0:8080 \
    MARINA_CONTROL__PUBLIC_URL=http://localhost:8080 \
    MARINA_PROXY__LISTEN=0.0.0.0:8000 \
    MARINA_PROXY__PUBLIC_URL=http://localhost:8000 \
    MARINA_PROXY__ADMIN_LISTEN=0.0.0.0:9090
EXPOSE 8080 8000 9090
VOLUME ["/var/lib/marina"]
# tini as PID 1 reaps orphans: a notebook's kernel processes whose Marimo died, and the
# sandboxes of a control plane that restarted in the same container, would otherwise stay
# zombies (the load test saw them reparented to PID 1).
ENTRYPOINT ["/usr/bin/tini", "--", "marina"]
CMD ["serve"]
