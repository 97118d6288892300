# Quiver on one NVIDIA GPU.
#   docker build -t quiver .
#   docker run --gpus all -p 8000:8000 -v "$PWD/my-adapters:/adapters:ro" quiver
# Arguments after the image name are appended to `quiver serve`; a repeated flag wins
# (argparse keeps the last), e.g. `quiver --model /models/x.gguf` or `quiver --device cpu`.

# PyPI's CUDA build of torch brings the CUDA libraries as wheels, so the base needs only the Python the
# locks are made for; the host's driver arrives with --gpus.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    QUIVER_CACHE=/var/cache/quiver \
    TRITON_CACHE_DIR=/var/cache/quiver/triton

# Triton builds its CUDA driver shim and each kernel's launcher with a C compiler on first use: gcc and
# the C library's headers, checked here by compiling against Python's headers as Triton does. With
# --device cpu, g++ builds Quiver's CPU kernels (kernels/cpu_kernels.cpp) once into QUIVER_CACHE.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && printf '#include <Python.h>\nint main(void) { return 0; }\n' > /tmp/probe.c \
    && gcc -I/usr/local/include/python3.11 /tmp/probe.c -o /tmp/probe && /tmp/probe && rm /tmp/probe /tmp/probe.c

WORKDIR /app
# The image's lock, made with CI's: the same torch (the CUDA build) and Triton as the tests, every
# package at one version with its hashes, nothing resolved anew.
COPY requirements/lock-gpu.txt ./requirements/
RUN pip install --no-cache-dir --no-deps --require-hashes -r requirements/lock-gpu.txt
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
COPY bench ./bench
# Quiver itself, with the lock's setuptools ('./' reads as a path, so hadolint asks no pin).
RUN pip install --no-cache-dir --no-deps --no-build-isolation ./

# Fixed UID/GID so host-side ownership of mounted adapters and caches is predictable.
# The GGUF is converted into QUIVER_CACHE on first start, and Triton's compiled kernels are kept there:
# mount it to keep both across containers.
RUN groupadd --gid 10001 quiver \
    && useradd --no-log-init --create-home --uid 10001 --gid quiver quiver \
    && mkdir -p /adapters "$TRITON_CACHE_DIR" \
    && chown -R quiver:quiver /adapters "$QUIVER_CACHE"
VOLUME ["/adapters"]
# Numeric, so runtimes (e.g. Kubernetes runAsNonRoot) can tell it is not root without /etc/passwd.
USER 10001:10001

EXPOSE 8000
# No curl in the image. First start converts the GGUF (~35 s on CPU), hence the start period. /health is
# 503 while the engine cannot make progress (e.g. a failed GPU), so the runtime restarts the container.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Flags every container needs live in ENTRYPOINT, so `docker run quiver --model ...` keeps them
# (arguments after the image replace CMD, not ENTRYPOINT). On a GPU the defaults are GPU defaults:
# dtype auto (the checkpoint's, mostly bf16), the KV cache from --gpu-memory-utilization (0.9),
# 256 sequences and 8192 tokens a step.
# It listens on 0.0.0.0: without --api-key (or QUIVER_API_KEY) anyone who can reach the port can generate
# and load or unload adapters, and start-up logs a WARNING saying so.
ENTRYPOINT ["quiver", "serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda", "--adapter-dir", "/adapters", "--adapter-root", "/adapters"]
CMD []
