"""Run the real target CLI as a subprocess and read everything it produced.

End-to-end tests go through the console entry point exactly as Meltano does: a config file, input
on stdin, STATE on stdout, logs and the summary on stderr, and an exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from target_catena_messages.catena.auth import ClientCredentialsTokenProvider
from target_catena_messages.catena.client import CatenaClient, make_session

SANDBOX_SECRET = "s3cret-test-value-0123456789"
_Client = TypeVar("_Client", bound=CatenaClient)


def sandbox_client(url: str, cls: type[_Client], *, pool: int = 8) -> _Client:
    """A real Catena client for the sandbox at ``url``, with client credentials."""
    session = make_session(pool)
    tokens = ClientCredentialsTokenProvider(
        session,
        f"{url}/realms/catena/protocol/openid-connect/token",
        "test-client",
        SANDBOX_SECRET,
        timeout=5,
    )
    return cls(url, tokens, session, timeout=5)


@dataclass
class TargetResult:
    returncode: int
    stdout: str
    stderr: str
    states: list[dict[str, Any]]
    summary: dict[str, Any] | None
    dead_letters: list[dict[str, Any]]
    workdir: Path = field(repr=False)

    @property
    def last_state(self) -> dict[str, Any] | None:
        return self.states[-1] if self.states else None

    def operations(self) -> list[list[str]]:
        return [op for s in self.states for op in s["target_catena_messages"]["operations"]]


def singer_lines(
    stream: str,
    records: Iterable[Mapping[str, Any]],
    *,
    key_properties: list[str] | None = None,
    properties: Mapping[str, Any] | None = None,
    state_every: int | None = None,
) -> list[str]:
    """A Singer stream: SCHEMA, RECORDs and (optionally) a STATE after every N records."""
    records = list(records)
    props = dict(properties or {})
    for r in records:
        for k in r:
            props.setdefault(k, {})
    lines = [
        json.dumps(
            {
                "type": "SCHEMA",
                "stream": stream,
                "schema": {"type": "object", "properties": props},
                "key_properties": ["id"] if key_properties is None else key_properties,
            }
        )
    ]
    for i, r in enumerate(records, 1):
        lines.append(json.dumps({"type": "RECORD", "stream": stream, "record": r}))
        if state_every and i % state_every == 0:
            lines.append(state_line(stream, i))
    if state_every and len(records) % state_every:
        lines.append(state_line(stream, len(records)))
    return lines


def state_line(stream: str, position: int) -> str:
    return json.dumps(
        {"type": "STATE", "value": {"bookmarks": {stream: {"replication_key_value": position}}}}
    )


def run_target(
    workdir: Path,
    config: Mapping[str, Any],
    lines: Iterable[str] | bytes,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> TargetResult:
    """Run ``python -m target_catena_messages`` with ``config`` and the given input."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg.setdefault("dead_letter_path", str(workdir / "dead-letters.jsonl"))
    cfg.setdefault("ledger_url", f"sqlite:///{workdir / 'ledger.sqlite'}")
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(cfg))
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
    proc = subprocess.run(
        [sys.executable, "-m", "target_catena_messages", "--config", str(config_path)],
        input=data,
        capture_output=True,
        cwd=workdir,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    states = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    summary = None
    for line in stderr.splitlines():
        if line.startswith('{"summary":'):
            summary = json.loads(line)["summary"]
    dl_path = Path(cfg["dead_letter_path"])
    dead = (
        [json.loads(x) for x in dl_path.read_text().splitlines() if x.strip()]
        if dl_path.exists()
        else []
    )
    return TargetResult(proc.returncode, stdout, stderr, states, summary, dead, workdir)


def sandbox_config(url: str, **extra: Any) -> dict[str, Any]:
    """Target settings pointing at a sandbox."""
    return {
        "api_url": url,
        "auth_url": f"{url}/realms/catena/protocol/openid-connect/token",
        "client_id": "test-client",
        "client_secret": "s3cret-test-value-0123456789",
        **extra,
    }
