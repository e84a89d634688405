"""``fleetlm router``: one OpenAI-compatible endpoint over many ``fleetlm serve`` replicas
(docs/ROUTER.md). Policies (``policies.py``) are shared with the data-parallel front end."""
