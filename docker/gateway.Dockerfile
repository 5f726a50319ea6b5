# The sd-triton gateway: FastAPI over Triton gRPC. Slim, non-root, and without torch.
#
#   docker build -f docker/gateway.Dockerfile -t sd-triton-gateway .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY docker/requirements-gateway.txt ./
RUN pip install --no-cache-dir -r requirements-gateway.txt

# sd_triton/ links export/, gateway/ and perf/ in: all four are copied for the wheel build
COPY pyproject.toml README.md ./
COPY sd_triton ./sd_triton
COPY export ./export
COPY gateway ./gateway
COPY perf ./perf
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
    && mkdir -p /data && chown gateway /data

USER 10001
ENV SD_GATEWAY_HOST=0.0.0.0 \
    SD_GATEWAY_PORT=8080 \
    SD_TRITON_STATE_DIR=/data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

# uvicorn via sd_triton.gateway.main.serve: SIGTERM drains (SD_GATEWAY_SHUTDOWN_GRACE_S, then SD_GATEWAY_JOB_DRAIN_S)
ENTRYPOINT ["python", "-m", "sd_triton.gateway"]
