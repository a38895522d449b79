"""The sandbox's two-speed validation and its hand-made operation ids.

The sandbox decides valid/invalid with a compiled fastjsonschema check and runs jsonschema's full
pass only for invalid bodies (docs/sandbox.md, "Performance"). Its 422 answers are only right if
the two always agree, so that is tested here on the same generated bodies the target's own
validator is tested with.
"""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from target_catena_messages.sandbox import schemas
from target_catena_messages.sandbox.store import new_id
from tests.test_message_properties import records

bodies = st.one_of(
    records(),
    records(),
    records(),
    st.sampled_from([None, [], "body", 1, {"message_text": None}, {}]),
)


@settings(max_examples=600, deadline=None)
@given(version=st.sampled_from(sorted(schemas.SCHEMAS)), body=bodies)
def test_fast_verdict_agrees_with_the_full_jsonschema_pass(version: str, body: Any) -> None:
    full = list(schemas._VALIDATORS[version].iter_errors(body))
    assert schemas._FAST[version](body) == (not full), [e.message for e in full]
    assert (schemas.validate_body(version, body) == []) == (not full)


def test_operation_ids_are_distinct_canonical_version_4_uuids() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lower case, canonical dashes
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
