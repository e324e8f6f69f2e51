# fednnunet runtime: coordinator, site workers, the CLI client and the one-shot init jobs.
# Built by deploy/docker/build.sh from the local Debian base and the host wheelhouse
# (no registry pulls). runtime.lock holds the exact versions the host resolved from
# pyproject.toml (torch/torchvision pins included); the torch wheel is the CUDA build
# (the only 2.14.1 build reachable here) and runs on CPU when no GPU is visible.
ARG BASE=local/debian:bookworm
FROM ${BASE}
ARG WHEELS
ARG LOCK_SHA
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        ca-certificates && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

# Third-party packages in one cached layer (rebuilt only when runtime.lock changes):
# exact versions, --no-deps, so no resolver runs inside the build.
RUN echo "runtime.lock $LOCK_SHA" && pip install --no-index --no-deps --find-links "$WHEELS" \
        -r "${WHEELS}runtime.lock"

WORKDIR /opt/fednnunet
COPY pyproject.toml README.md ./
COPY fednnunet ./fednnunet
RUN pip install --no-index --no-deps --find-links "$WHEELS" . && rm -rf build *.egg-info && pip check

# Unprivileged: a site worker needs its data volume and the network, nothing else.
RUN useradd --create-home --uid 10001 fed && mkdir -p /data && chown fed /data
USER fed
ENV nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed \
    nnUNet_results=/data/nnUNet_results
CMD ["fednnunet", "--help"]
