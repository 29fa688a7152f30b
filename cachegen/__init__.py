"""cachegen: long-context LLM serving that reuses coded KV caches across requests and machines."""

__version__ = "0.1.0"
