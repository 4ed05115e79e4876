"""glm-gateway: an async reverse proxy that guards and observes vLLM engines."""

__version__ = "0.1.0"
