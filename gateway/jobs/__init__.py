"""Async jobs: their data (models.py), the queue and the runners (manager.py), the signed webhooks
(webhooks.py), their keys in the state store (store.py). The routes are gateway/api/jobs.py."""
