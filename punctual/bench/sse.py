"""Server-sent events, decoded incrementally from raw bytes so each event's arrival time is exact."""
from __future__ import annotations


class SSEDecoder:
    """Feed bytes as they arrive; get back the `data` of each event that completed.

    Follows the SSE format: lines end in LF, CRLF or CR; an event ends at a blank line; its
    `data:` lines are joined with newlines; one space after the colon is dropped; comment
    lines (starting with ':') and other fields (event, id, retry) are ignored.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events = []
        while True:
            line, ending = self._next_line()
            if line is None:
                return events
            self._buffer = self._buffer[ending:]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)

    def close(self) -> list[str]:
        """The last event, if the stream ended without its blank line."""
        events = []
        if self._buffer:
            event = self._line(self._buffer.decode("utf-8", errors="replace"))
            self._buffer = b""
            if event is not None:
                events.append(event)
        event = self._line("")
        return events + ([event] if event is not None else [])

    def _next_line(self) -> tuple[bytes | None, int]:
        lf, cr = self._buffer.find(b"\n"), self._buffer.find(b"\r")
        if cr != -1 and (lf == -1 or cr < lf):
            if cr + 1 == len(self._buffer):
                return None, 0  # a CR at the end may be the first half of CRLF: wait for more
            return self._buffer[:cr], cr + (2 if self._buffer[cr + 1:cr + 2] == b"\n" else 1)
        if lf != -1:
            return self._buffer[:lf], lf + 1
        return None, 0

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None
