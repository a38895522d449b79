"""A real Meltano, installed once, and throwaway Meltano projects made from the repo's meltano.yml.

Meltano pins SQLAlchemy < 2.1 and the project's venv has 2.1 (the ledger), so Meltano lives in a
venv of its own, ``.venv/meltano-tool/``, created on first use (about 35 s with pip) and reused
while its stamp matches the requirement. Plugin venvs (tap-postgres, and this repo installed
editable) are cached in ``.venv/meltano-plugins/``: each test project links its
``.meltano/extractors`` and ``.meltano/loaders`` there, so ``meltano install`` only refreshes
them. Everything else of a project (system database with the state, logs, the target's ledger
and dead letters) stays in the project's own directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the typing group

REPO = Path(__file__).resolve().parents[2]
MELTANO_REQUIREMENT = "meltano~=4.4"
TOOL_VENV = REPO / ".venv" / "meltano-tool"
PLUGIN_CACHE = REPO / ".venv" / "meltano-plugins"
LOADER = "target-catena-messages"

# Variables a developer's shell may carry that would change what the test project does.
_FOREIGN_PREFIXES = ("MELTANO_", "TARGET_CATENA_MESSAGES_", "TAP_TMS_", "TAP_POSTGRES_")


def ensure_meltano() -> Path:
    """The ``meltano`` executable of the tool venv, installing it first if needed."""
    exe = TOOL_VENV / "bin" / "meltano"
    stamp = TOOL_VENV / ".installed"
    if exe.exists() and stamp.exists() and stamp.read_text() == MELTANO_REQUIREMENT:
        return exe
    shutil.rmtree(TOOL_VENV, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(TOOL_VENV)], check=True)
    pip = subprocess.run(
        [
            str(TOOL_VENV / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            MELTANO_REQUIREMENT,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if pip.returncode != 0:
        raise RuntimeError(f"pip install {MELTANO_REQUIREMENT} failed:\n{pip.stdout}{pip.stderr}")
    stamp.write_text(MELTANO_REQUIREMENT)
    print(  # pytest shows it with -s: it says where the time went
        f"installed {MELTANO_REQUIREMENT} in {time.monotonic() - started:.0f} s", file=sys.stderr
    )
    return exe


def meltano_schema_path() -> Path:
    """meltano.yml's JSON Schema, as shipped inside the installed Meltano."""
    found = sorted(TOOL_VENV.glob("lib/python*/site-packages/meltano/schemas/meltano.schema.json"))
    if not found:
        raise FileNotFoundError(f"no meltano.schema.json under {TOOL_VENV}")
    return found[-1]


def load_meltano_yml(path: Path = REPO / "meltano.yml") -> dict[str, Any]:
    """The repo's meltano.yml as data."""
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


@dataclass
class MeltanoProject:
    """One throwaway Meltano project; ``run`` calls the real CLI in it."""

    root: Path
    exe: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``meltano ARGS`` in the project; output is text, stdout and stderr apart.

        Each command's output is also kept in ``commands.log`` in the project, for the failure
        that only shows up in CI.
        """
        proc = subprocess.run(
            [str(self.exe), *args],
            cwd=self.root,
            env={**self.env, **(env or {})},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        with (self.root / "commands.log").open("a", encoding="utf-8") as log:
            log.write(f"$ meltano {' '.join(args)}  # exit {proc.returncode}\n")
            log.write(proc.stdout + proc.stderr + "\n")
        return proc

    def state(self, state_id: str) -> dict[str, Any]:
        """What Meltano's state store holds for ``state_id`` (the tap's next ``--state``)."""
        proc = self.run("state", "get", state_id)
        if proc.returncode != 0:
            raise AssertionError(f"meltano state get failed:\n{proc.stderr}")
        value: dict[str, Any] = json.loads(proc.stdout)
        return value

    @property
    def target_dir(self) -> Path:
        """Where the target keeps its ledger and dead letters by default inside Meltano."""
        return self.root / ".meltano" / "target-catena-messages"


def make_project(root: Path, exe: Path, env: Mapping[str, str]) -> MeltanoProject:
    """A project in ``root`` from the repo's meltano.yml, the loader installed from this repo.

    Only the loader's ``pip_url`` changes (``-e .`` means the project directory, which here is
    not the repo). Plugin venvs are linked to the shared cache.
    """
    root.mkdir(parents=True, exist_ok=True)
    data = load_meltano_yml()
    for loader in data["plugins"]["loaders"]:
        if loader["name"] == LOADER:
            loader["pip_url"] = f"-e {REPO}"
    (root / "meltano.yml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    system_dir = root / ".meltano"
    system_dir.mkdir(exist_ok=True)
    for kind in ("extractors", "loaders"):
        cached = PLUGIN_CACHE / kind
        cached.mkdir(parents=True, exist_ok=True)
        (system_dir / kind).symlink_to(cached, target_is_directory=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    clean.update({"MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false", "NO_COLOR": "1", **env})
    return MeltanoProject(root, exe, clean)


def summaries(output: str) -> list[dict[str, Any]]:
    """The target's JSON summaries (``{"summary": ...}``) found in Meltano's log output.

    In the text log format the line is there as written; with ``--log-format=json`` it is the
    ``event`` string of one of Meltano's JSON events.
    """
    decoder = json.JSONDecoder()
    found = []
    for line in output.splitlines():
        event = json_event(line)
        text = event["event"] if event is not None and isinstance(event.get("event"), str) else line
        at = text.find('{"summary":')
        if at >= 0:
            value, _ = decoder.raw_decode(text[at:])
            found.append(value["summary"])
    return found


def json_event(line: str) -> dict[str, Any] | None:
    """One event of Meltano's ``--log-format=json`` output, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "event" in value else None


def require_success(proc: subprocess.CompletedProcess[str], what: Sequence[str]) -> str:
    """Both streams of a finished Meltano command that must have succeeded."""
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-60:])
        raise AssertionError(f"meltano {' '.join(what)} exited {proc.returncode}:\n{tail}")
    return output
