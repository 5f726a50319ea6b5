"""The gateway's routes, one router per resource; `create_app` (gateway/main.py) includes them all."""
