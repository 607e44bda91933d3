"""pipeshift: LLM serving whose pipeline layout changes live."""
