"""Pydantic models of the wire payloads (CONTRACT.md) and of the read responses."""
