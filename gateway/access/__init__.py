"""Who may send what: API keys (keys.py), per-key rate limits (limits.py) and the request-path stage (guard.py)."""
