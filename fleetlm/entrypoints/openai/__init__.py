"""The OpenAI-compatible HTTP server (``fleetlm serve``)."""
