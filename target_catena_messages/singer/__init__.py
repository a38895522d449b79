"""Everything that touches singer-sdk: the Target, the sink, the reader, the private SDK hooks."""
