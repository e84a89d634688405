"""Disaggregated prefill and decode: K/V transfer between engines (docs/DISAGG.md).

``KVTransferConfig`` (``config.py``) picks the role and the transport; ``KVConnector``
(``connector.py``) is the engine core's side; ``transports.py`` moves the bytes; ``server.py``
and ``client.py`` are the producer's and the consumer's ends of the control channel;
``offline.py`` runs a producer and a consumer ``LLM`` together; ``http.py`` is the servers' side
of the HTTP flow and ``fleetlm/router/pd.py`` (with ``relay.py``) the router's.
"""

from fleetlm.disagg.config import KVTransferConfig

__all__ = ["KVTransferConfig"]
