"""Integrations with other libraries (transformers' attention registry)."""
