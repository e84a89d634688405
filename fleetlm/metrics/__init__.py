"""Engine statistics (``stats``) and their Prometheus export (``prometheus``)."""
