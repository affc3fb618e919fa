"""Serving: an OpenAI-compatible endpoint on Ray Serve.

engine (continuous batching, no Ray), scheduler (admission by the KV cache the batch will allocate), health (failed and
stalled steps, error ids), sampling (sampler, detokenizer, stops), api (schemas, errors), service (what a request
needs: engine, tokenizer, limits, keys), routes (the FastAPI app, no Ray), auth and limits (keys, request limits),
monitor (metrics and drift), proxy and ingress (how HTTP reaches the replicas), app (the Serve deployment and
`build_app`).
"""
