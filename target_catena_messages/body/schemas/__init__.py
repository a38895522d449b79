"""Create Message request body schemas, one per body version (JSON Schema draft 2020-12)."""
