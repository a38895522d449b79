"""The two Create Message request body schemas, as package data (JSON Schema draft 2020-12)."""
