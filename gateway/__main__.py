"""`python -m gateway`: serve the gateway with settings from `SD_GATEWAY_*` (see gateway/settings.py)."""

from gateway.main import serve

serve()
