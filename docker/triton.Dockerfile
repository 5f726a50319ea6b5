# Triton for sd-triton on an NVIDIA GPU: the NGC server (24.10 = Triton 2.51, the version the CPU
# server in the tests runs) with the python packages the python backend models import, and the
# sd_triton package itself. The model repository is mounted at /models (or baked: see docker/README.md).
#
#   docker build -f docker/triton.Dockerfile -t sd-triton-triton .
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/sd-triton
COPY docker/requirements-triton.txt ./
RUN pip install --no-cache-dir -r requirements-triton.txt

# the package only (its dependencies are the pinned ones above); the image's Python is 3.10 (Ubuntu
# 22.04), the one its python backend stub is built for: the package supports 3.10+ (make pycompat)
COPY pyproject.toml README.md ./
COPY sd_triton ./sd_triton
COPY export ./export
COPY gateway ./gateway
COPY perf ./perf
RUN pip install --no-cache-dir --no-deps .

# the state directory: the export's work files (TensorRT's timing cache), the logs
ENV SD_TRITON_STATE_DIR=/var/lib/sd-triton
VOLUME ["/models"]
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://localhost:8000/v2/health/ready"]

# First `sd-triton engine check`: it refuses TensorRT plans built for another GPU or TensorRT version.
# Explicit model control: `sd-triton engine set` loads new engine versions without a restart.
ENTRYPOINT ["/bin/sh", "-c", "sd-triton engine check --repo /models && exec tritonserver --model-repository=/models --model-control-mode=explicit --load-model=* --disable-auto-complete-config"]
