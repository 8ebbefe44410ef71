"""The OpenAI-compatible HTTP server: app, engine thread bridge, metrics, CLI (docs/serving.md)."""
