"""Serving: a continuous-batching engine, an OpenAI-compatible API and a web UI.

``create_app(model, settings)`` (``minigem.serving.api``) builds the FastAPI app;
``minigem serve`` runs it. Nothing heavy is imported here.
"""
