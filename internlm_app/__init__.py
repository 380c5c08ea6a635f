"""InternLM2 Chat: a native-transformers runtime, chat engine, web app and API for InternLM2-chat-7B."""

__version__ = "0.1.0"
