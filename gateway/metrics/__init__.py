"""Prometheus collectors: the gateway's own series, the engines', the GPUs' and the host's."""
