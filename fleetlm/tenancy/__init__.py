"""Multi-tenant serving (issue 15): tenants from API keys (``config``, ``registry``), quotas
(``quota``), per-request salts and priorities (``admission``), admission and accounting in the
server (``gate``, ``server``) and per-tenant metrics (``metrics``). The fair scheduling policy
lives in the engine core: ``fleetlm/core/fair_queue.py``. See docs/TENANCY.md."""
