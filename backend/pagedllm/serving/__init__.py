"""Glue between Triton's Python backend and the engine: request parsing, the engine thread, the model."""
