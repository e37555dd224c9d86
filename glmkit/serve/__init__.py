"""HTTP serving: OpenAI-compatible and legacy ChatGLM APIs over the batching engine."""
