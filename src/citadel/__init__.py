"""Citadel: an OpenAI-compatible gateway platform for self-hosted language models."""

__version__ = "0.1.0"
