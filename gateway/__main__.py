"""`python -m sd_triton.gateway`: serve the gateway with settings from `SD_GATEWAY_*` (settings.py)."""

from sd_triton.gateway.main import serve

serve()
