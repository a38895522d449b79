"""The Singer input reader: msgspec speed, and bad lines named by number without a dump.

singer-sdk's msgspec reader logs the whole offending line with a traceback; a 1 MB line or a
message text in the logs is not what an operator needs. This one says which line and why. The
read loop and the decoder it stands on are singer-sdk's, reached through ``sdk_compat``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from singer_sdk.singerlib.exceptions import InvalidInputLine

from target_catena_messages.singer.sdk_compat import LeanReader, decode_line


class MessageReader(LeanReader):
    """Counts lines so every input error can name its line."""

    def __init__(self) -> None:
        super().__init__()
        self.line_number = 0

    def deserialize_json(self, line: str) -> dict[str, Any]:
        """Decode one line; a malformed or truncated line is one clear error."""
        self.line_number += 1
        try:
            value = decode_line(line)
        except msgspec.DecodeError as exc:
            raise InvalidInputLine(
                f"input line {self.line_number} is not valid JSON ({exc})"
            ) from None
        except UnicodeError:  # undecodable bytes arrive as surrogates (surrogateescape)
            raise InvalidInputLine(f"input line {self.line_number} is not valid UTF-8") from None
        except RecursionError:
            raise InvalidInputLine(f"input line {self.line_number} is nested too deeply") from None
        if not isinstance(value, dict):
            raise InvalidInputLine(f"input line {self.line_number} is not a JSON object")
        return value
