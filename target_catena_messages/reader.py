"""The Singer input reader: msgspec speed, and bad lines named by number without a dump.

singer-sdk's msgspec reader logs the whole offending line with a traceback; a 1 MB line or a
message text in the logs is not what an operator needs. This one says which line and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import IO, Any

import msgspec
from singer_sdk.contrib.msgspec import MsgSpecReader, decoder
from singer_sdk.singerlib.exceptions import InvalidInputLine


class MessageReader(MsgSpecReader):
    """Counts lines so every input error can name its line."""

    def __init__(self) -> None:
        super().__init__()
        self.line_number = 0

    def process_lines(
        self,
        file_input: IO[str] | None,
        callbacks: dict[str, Callable[[dict[str, Any]], None]],
    ) -> Counter[str]:
        """singer-sdk's loop, with the per-line checks folded into one place.

        The same steps and errors as ``GenericSingerReader.process_lines`` (decode, require
        ``type``, call the callback or ``_process_unknown_message``, count by type), minus
        two calls and a set per line: this loop runs once per record.
        """
        stats: dict[Any, int] = {}
        deserialize = self.deserialize_json
        for line in file_input or self.default_input:
            self._current_message = line
            line_dict = deserialize(line)
            record_type: Any = line_dict.get("type")
            if record_type is None and "type" not in line_dict:
                self.assert_line_requires(line_dict, requires={"type"})  # raises, as the SDK
            if callback := callbacks.get(record_type):
                callback(line_dict)
            else:
                self._process_unknown_message(line_dict)
            stats[record_type] = stats.get(record_type, 0) + 1
        return Counter(stats)

    def deserialize_json(self, line: str) -> dict[str, Any]:
        """Decode one line; a malformed or truncated line is one clear error."""
        self.line_number += 1
        try:
            value = decoder.decode(line)
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
