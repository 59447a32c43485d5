# The memstore daemon and command line, and the demo client (scripts/demo.py), in one image.
#
#   docker build -t engram-memstore:0.1.0 .
#   docker run --rm engram-memstore:0.1.0 --help
#
# CPU PyTorch by default. Another build, e.g. CUDA 12.8 for a GPU client:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t engram-memstore:0.1.0-cu128 .
# The daemon computes on the CPU; the CUDA wheels would add several GB to every daemon's image.

ARG PYTHON_VERSION=3.11

# Build stage: a compiler for the optional C extensions (memstore/_rowgen.c, the row generator;
# memstore/_fatal.c, the SIGBUS reporter; memstore/_directio.c, the row cache's reads; model/_cachesim.c,
# the cache simulator); the runtime image gets the finished virtual environment only.
FROM python:${PYTHON_VERSION}-slim AS build
# Unpinned (DL3008): the compiler is the base release's, and never reaches the runtime image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Torch first, from the PyTorch index: PyPI's Linux wheel is the CUDA build (several GB).
# The version is requirements-dev.txt's pin (tests/test_deploy.py checks they agree).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

# The project with the dependencies pyproject.toml declares (torch is already satisfied), and
# its `model` extra (the tokenizer), since the image runs the demo model too.
# setuptools skips an optional extension that fails to compile; with gcc here it must not have.
COPY pyproject.toml README.md /src/
COPY memstore /src/memstore
COPY client /src/client
COPY model /src/model
RUN pip install "/src[model]" && python -c "import memstore._rowgen, memstore._fatal, memstore._directio, model._cachesim"

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --gid 10001 memstore && useradd --uid 10001 --gid 10001 --create-home memstore
COPY --from=build /opt/venv /opt/venv
# Unbuffered: log lines reach `docker logs` as they are written.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
# The demo script imports the installed packages (no sources here that could shadow them) and
# caches its generated corpus and tokenizer in /app/data. The directories that volumes mount
# over are created owned by the service user, so new named volumes start writable by it.
WORKDIR /app
COPY scripts/demo.py scripts/
RUN mkdir -p /app/data /tables /runs && chown memstore:memstore /app/data /tables /runs
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["memstore"]
CMD ["--help"]
