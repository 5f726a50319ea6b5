"""Who may generate, and how much: API keys (keys.py), per-key rate limits, quotas and concurrency
(limits.py), the prompt content policy (policy.py), and the middleware and per-request view that apply
them (control.py)."""
