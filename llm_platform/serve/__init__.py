"""Serving: an OpenAI-compatible endpoint on Ray Serve.

engine (continuous batching, no Ray), sampling (sampler, detokenizer, stops), api (schemas, errors), routes (the
FastAPI app, no Ray), monitor (metrics and drift), app (the Serve deployment and `build_app`).
"""
