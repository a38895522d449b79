"""Create Message bodies: which versions exist, how a record becomes a body, how one is checked.

``versions`` is the registry (one class per body version, one JSON schema each); nothing outside
it compares version names.
"""
