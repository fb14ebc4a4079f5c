"""Ray Serve embedding service: config, batching and backends (plain Python) plus a thin Ray shell."""
