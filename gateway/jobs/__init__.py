"""Async jobs: their data (models.py), the queue and the runners (manager.py), the signed webhooks
(webhooks.py). The routes are gateway/api/jobs.py."""
