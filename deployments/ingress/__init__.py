"""The front of the service, per request: HTTP and the OpenAI codec, admission, keys, the router, and how it
reaches a model (coalescer, cache, retries).
"""
