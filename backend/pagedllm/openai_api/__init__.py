"""OpenAI-compatible HTTP front end: request parsing that runs without torch (see embeds_payload)."""
