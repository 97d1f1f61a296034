"""The OpenAI-compatible HTTP server: FastAPI front end, engine core in its own process."""
