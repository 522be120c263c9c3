"""Prompt text and model answers: sandboxed templates, JSON schemas and their narrowing, checks of written text."""
