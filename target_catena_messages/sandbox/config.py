"""The sandbox configuration: a JSON document turned into typed, validated dataclasses.

Every problem in a config is collected and reported at once (with its JSON path), because a fault
plan is usually written by hand for one test and a silent typo would make that test pass for the
wrong reason. Unknown keys are errors for the same reason. The dataclasses and the reader that
validates into them stay in one module (longer than most) so the config's schema lives in one place.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from target_catena_messages import jsonutil

MESSAGE_SCHEMAS = ("source_ids", "catena_ids")
ENDPOINTS = ("messages", "token", "revoke", "operations", "users", "any")
ACTION_KINDS = ("status", "reset", "drop", "refuse", "forbid", "sync_fail")
KINDS = ("latency", "revoke_tokens", *ACTION_KINDS)
ERROR_TYPES = ("auth", "validation", "network", "tsp")
DEFAULT_PARTNER_ID = "5a9d2a0e-6a4c-4b9e-9a57-5b1f0c1e2d3f"

_MATCH_KEYS = frozenset(
    {"requests", "from", "to", "every", "probability", "times", "connection_id"}
    | {"after_seconds", "for_seconds"}
)
_KIND_PARAMS: dict[str, frozenset[str]] = {
    "latency": frozenset({"ms", "jitter_ms"}),
    "status": frozenset(
        {"status", "retry_after_seconds", "retry_after_header", "non_json", "after_processing"}
    ),
    "reset": frozenset(),
    "drop": frozenset(),
    "refuse": frozenset({"seconds"}),
    "revoke_tokens": frozenset(),
    "forbid": frozenset(),
    "sync_fail": frozenset({"error_type", "error_details", "response_status_code"}),
}
_TOP_KEYS = frozenset(
    {
        "message_schema",
        "partner_id",
        "source_name",
        "token_lifetime_seconds",
        "credentials",
        "list_lag_seconds",
        "list_lag_tail",
        "payload_normalisation",
        "rate_limit_per_second",
        "rate_limit_retry_after",
        "operations",
        "users",
        "faults",
    }
)


class SandboxConfigError(ValueError):
    """The sandbox config is invalid; ``problems`` lists every problem with its JSON path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid sandbox config: " + "; ".join(problems))


@dataclass(frozen=True)
class Match:
    """Conditions that must all hold for a rule to fire (absent ones always hold)."""

    requests: frozenset[int] | None = None
    from_n: int | None = None
    to_n: int | None = None
    every: int | None = None
    probability: float | None = None
    times: int | None = None
    connection_id: str | None = None
    after_seconds: float | None = None
    for_seconds: float | None = None


@dataclass(frozen=True)
class FaultRule:
    """One rule of the fault plan; parameters not used by ``kind`` keep their defaults."""

    kind: str
    endpoint: str = "messages"
    match: Match = field(default_factory=Match)
    index: int = 0
    ms: float = 0.0
    jitter_ms: float = 0.0
    status: int = 500
    retry_after_seconds: int | None = None
    retry_after_header: bool = False
    non_json: bool = False
    after_processing: bool = False
    seconds: float = 1.0
    error_type: str = "tsp"
    error_details: str = "The TSP rejected the message (sandbox sync_fail)"
    response_status_code: int | None = None

    @property
    def label(self) -> str:
        """Short name used in ``received()`` entries, e.g. ``status:503`` or ``reset``."""
        if self.kind == "status":
            return f"status:{self.status}"
        if self.kind == "latency":
            return f"latency:{self.ms:g}ms"
        return self.kind


@dataclass(frozen=True)
class FaultPlanConfig:
    """The seed of the plan's random generator and its rules, in priority order."""

    seed: int = 0
    rules: tuple[FaultRule, ...] = ()


@dataclass(frozen=True)
class OperationsConfig:
    """When pending operations settle by themselves, and which of them fail."""

    complete_after_seconds: float | None = None
    fail: Match | None = None
    error_type: str = "tsp"
    error_details: str = "The TSP rejected the message (sandbox)"


@dataclass(frozen=True)
class LagTail:
    """A long tail of the list lag: some operations appear in LIST much later than the rest.

    Decided once per operation, at creation, by ``match`` over the POST /messages that created
    it (a ``probability`` draws from the tail's own generator, seeded with the fault plan's seed,
    so it never shifts the plan's draws): a matching operation appears only ``seconds`` after
    ``list_lag_seconds`` would have shown it.
    """

    seconds: float = 0.0
    match: Match | None = None


TEXT_NORMALISATIONS = ("trim", "collapse_whitespace")


@dataclass(frozen=True)
class PayloadNormalisation:
    """How the stored payload differs from the body sent, beyond what Catena always does.

    ``message_text``: ``trim`` strips leading and trailing whitespace, ``collapse_whitespace``
    also turns every run of whitespace into one space. A matcher that compares the body sent
    with the stored payload then cannot find the operation.
    """

    message_text: str | None = None


@dataclass(frozen=True)
class User:
    """A seeded telematics user (driver or dispatcher) of one connection."""

    id: str
    source_id: str
    connection_id: str
    is_driver: bool = True
    first_name: str | None = None
    last_name: str | None = None
    fleet_ref: str | None = None


@dataclass(frozen=True)
class Credentials:
    """One accepted client id/secret pair."""

    client_id: str
    client_secret: str = field(repr=False)


@dataclass(frozen=True)
class SandboxConfig:
    """The whole sandbox configuration; the defaults make a well-behaved Catena."""

    message_schema: str = "source_ids"
    partner_id: str = DEFAULT_PARTNER_ID
    source_name: str = "catena_simulator"
    token_lifetime_seconds: int = 3600
    credentials: tuple[Credentials, ...] = ()
    list_lag_seconds: float = 0.0
    list_lag_tail: LagTail = field(default_factory=LagTail)
    payload_normalisation: PayloadNormalisation = field(default_factory=PayloadNormalisation)
    rate_limit_per_second: float | None = None
    rate_limit_retry_after: bool = True
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    users: tuple[User, ...] = ()
    faults: FaultPlanConfig = field(default_factory=FaultPlanConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxConfig:
        """Build and validate a config from its JSON form.

        Raises:
            SandboxConfigError: listing every problem found.
        """
        reader = _Reader()
        config = reader.config(data)
        if reader.problems:
            raise SandboxConfigError(reader.problems)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> SandboxConfig:
        """Read a JSON config file.

        Raises:
            SandboxConfigError: when the file cannot be read, is not JSON or is invalid.
        """
        try:
            data = jsonutil.loads(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise SandboxConfigError([f"{path}: {exc}"]) from exc
        return cls.from_dict(data)


def load_config(source: SandboxConfig | Mapping[str, Any] | str | Path | None) -> SandboxConfig:
    """Accept any of the ways a config is handed over: object, dict, file path or nothing."""
    if source is None:
        return SandboxConfig()
    if isinstance(source, SandboxConfig):
        return source
    if isinstance(source, (str, Path)):
        return SandboxConfig.from_file(source)
    return SandboxConfig.from_dict(source)


def is_uuid(value: object) -> bool:
    """True for a canonical hyphenated UUID string (what ``format: uuid`` accepts)."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return all(value[i] == "-" for i in (8, 13, 18, 23))


class _Reader:
    """Reads the JSON form field by field, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def _bad(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def _obj(self, value: object, path: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self._bad(path, "must be an object")
            return {}
        for key in sorted(set(value) - allowed):
            self._bad(f"{path}.{key}" if path else key, "unknown key")
        return value

    def _num(
        self, data: Mapping[str, Any], key: str, path: str, default: float | None, minimum: float
    ) -> float | None:
        value = data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            self._bad(f"{path}{key}", f"must be a number >= {minimum:g}")
            return default
        return float(value)

    def _int(
        self, data: Mapping[str, Any], key: str, path: str, default: int | None, minimum: int
    ) -> int | None:
        value = data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self._bad(f"{path}{key}", f"must be an integer >= {minimum}")
            return default
        return value

    def _bool(self, data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self._bad(f"{path}{key}", "must be true or false")
            return default
        return value

    def _str(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        default: str | None,
        choices: tuple[str, ...] | None = None,
    ) -> str | None:
        value = data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            wanted = f"one of {', '.join(choices)}" if choices else "a string"
            self._bad(f"{path}{key}", f"must be {wanted}")
            return default
        return value

    def _uuid(
        self, data: Mapping[str, Any], key: str, path: str, default: str | None
    ) -> str | None:
        value = data.get(key, default)
        if value is None:
            return None
        if not is_uuid(value):
            self._bad(f"{path}{key}", "must be a UUID string")
            return default
        return str(value)

    def config(self, data: Mapping[str, Any]) -> SandboxConfig:
        data = self._obj(data, "", _TOP_KEYS)
        default = SandboxConfig()
        schema = self._str(data, "message_schema", "", "source_ids", MESSAGE_SCHEMAS)
        partner = self._uuid(data, "partner_id", "", DEFAULT_PARTNER_ID)
        lifetime = self._int(data, "token_lifetime_seconds", "", 3600, 0)
        lag = self._num(data, "list_lag_seconds", "", 0.0, 0.0)
        return SandboxConfig(
            message_schema=schema or default.message_schema,
            partner_id=partner or DEFAULT_PARTNER_ID,
            source_name=self._str(data, "source_name", "", default.source_name) or "",
            token_lifetime_seconds=3600 if lifetime is None else lifetime,
            credentials=self._credentials(data.get("credentials")),
            list_lag_seconds=lag or 0.0,
            list_lag_tail=self._lag_tail(data.get("list_lag_tail")),
            payload_normalisation=self._normalisation(data.get("payload_normalisation")),
            rate_limit_per_second=self._num(data, "rate_limit_per_second", "", None, 0.001),
            rate_limit_retry_after=self._bool(data, "rate_limit_retry_after", "", True),
            operations=self._operations(data.get("operations")),
            users=self._users(data.get("users")),
            faults=self._faults(data.get("faults")),
        )

    def _lag_tail(self, value: object) -> LagTail:
        if value is None:
            return LagTail()
        obj = self._obj(value, "list_lag_tail", frozenset({"seconds", "match"}))
        seconds = self._num(obj, "seconds", "list_lag_tail.", None, 0.0)
        match = self.match(obj["match"], "list_lag_tail.match") if "match" in obj else None
        if seconds is None or match is None:
            self._bad("list_lag_tail", "needs seconds (>= 0) and match (which operations lag)")
            return LagTail()
        return LagTail(seconds, match)

    def _normalisation(self, value: object) -> PayloadNormalisation:
        if value is None:
            return PayloadNormalisation()
        obj = self._obj(value, "payload_normalisation", frozenset({"message_text"}))
        text = self._str(obj, "message_text", "payload_normalisation.", None, TEXT_NORMALISATIONS)
        return PayloadNormalisation(message_text=text)

    def _credentials(self, value: object) -> tuple[Credentials, ...]:
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        out = []
        allowed = frozenset({"client_id", "client_secret"})
        for i, item in enumerate(items):
            path = f"credentials[{i}]" if isinstance(value, list) else "credentials"
            obj = self._obj(item, path, allowed)
            cid = self._str(obj, "client_id", path + ".", None)
            secret = self._str(obj, "client_secret", path + ".", None)
            if cid is None or secret is None:
                self._bad(path, "needs client_id and client_secret strings")
                continue
            out.append(Credentials(cid, secret))
        return tuple(out)

    def _operations(self, value: object) -> OperationsConfig:
        if value is None:
            return OperationsConfig()
        allowed = frozenset({"complete_after_seconds", "fail", "error_type", "error_details"})
        obj = self._obj(value, "operations", allowed)
        fail = obj.get("fail")
        default = OperationsConfig()
        return OperationsConfig(
            complete_after_seconds=self._num(obj, "complete_after_seconds", "operations.", None, 0),
            fail=None if fail is None else self.match(fail, "operations.fail"),
            error_type=self._str(obj, "error_type", "operations.", "tsp", ERROR_TYPES) or "tsp",
            error_details=self._str(obj, "error_details", "operations.", default.error_details)
            or "",
        )

    def _users(self, value: object) -> tuple[User, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self._bad("users", "must be a list")
            return ()
        allowed = frozenset(User.__dataclass_fields__)
        users = []
        for i, item in enumerate(value):
            path = f"users[{i}]."
            obj = self._obj(item, path[:-1], allowed)
            uid = self._uuid(obj, "id", path, None)
            conn = self._uuid(obj, "connection_id", path, None)
            source_id = self._str(obj, "source_id", path, None)
            if uid is None or conn is None or source_id is None:
                self._bad(path[:-1], "needs id (uuid), source_id and connection_id (uuid)")
                continue
            users.append(
                User(
                    id=uid,
                    source_id=source_id,
                    connection_id=conn,
                    is_driver=self._bool(obj, "is_driver", path, True),
                    first_name=self._str(obj, "first_name", path, None),
                    last_name=self._str(obj, "last_name", path, None),
                    fleet_ref=self._str(obj, "fleet_ref", path, None),
                )
            )
        return tuple(users)

    def _faults(self, value: object) -> FaultPlanConfig:
        if value is None:
            return FaultPlanConfig()
        obj = self._obj(value, "faults", frozenset({"seed", "rules"}))
        seed = obj.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            self._bad("faults.seed", "must be an integer")
            seed = 0
        rules = obj.get("rules", [])
        if not isinstance(rules, list):
            self._bad("faults.rules", "must be a list")
            return FaultPlanConfig(seed=seed)
        parsed = (self.rule(rule, i) for i, rule in enumerate(rules))
        return FaultPlanConfig(seed=seed, rules=tuple(r for r in parsed if r is not None))

    def rule(self, value: object, index: int) -> FaultRule | None:
        path = f"faults.rules[{index}]"
        if not isinstance(value, Mapping):
            self._bad(path, "must be an object")
            return None
        kind = value.get("kind")
        if kind not in KINDS:
            self._bad(f"{path}.kind", f"must be one of {', '.join(KINDS)}")
            return None
        obj = self._obj(value, path, _KIND_PARAMS[kind] | {"kind", "endpoint", "match"})
        p = path + "."
        endpoint = self._str(obj, "endpoint", p, "messages", ENDPOINTS) or "messages"
        if kind == "sync_fail" and endpoint != "messages":
            self._bad(f"{p}endpoint", "sync_fail only applies to messages")
        match = self.match(obj.get("match", {}), p + "match")
        base = FaultRule(kind=kind, endpoint=endpoint, match=match, index=index)
        params = {
            "latency": self._latency_params,
            "status": self._status_params,
            "refuse": self._refuse_params,
            "sync_fail": self._sync_fail_params,
        }.get(kind)
        return base if params is None else _replace(base, **params(obj, p, base))

    def _latency_params(self, obj: Mapping[str, Any], p: str, base: FaultRule) -> dict[str, Any]:
        return {
            "ms": self._num(obj, "ms", p, 0.0, 0.0),
            "jitter_ms": self._num(obj, "jitter_ms", p, 0.0, 0.0),
        }

    def _refuse_params(self, obj: Mapping[str, Any], p: str, base: FaultRule) -> dict[str, Any]:
        return {"seconds": self._num(obj, "seconds", p, 1.0, 0.0)}

    def _sync_fail_params(self, obj: Mapping[str, Any], p: str, base: FaultRule) -> dict[str, Any]:
        return {
            "error_type": self._str(obj, "error_type", p, "tsp", ERROR_TYPES),
            "error_details": self._str(obj, "error_details", p, base.error_details),
            "response_status_code": self._int(obj, "response_status_code", p, None, 100),
        }

    def _status_params(self, obj: Mapping[str, Any], p: str, base: FaultRule) -> dict[str, Any]:
        status = self._int(obj, "status", p, 500, 400) or 500
        if status > 599:
            self._bad(f"{p}status", "must be an HTTP error status (400..599)")
        retry_after = self._int(obj, "retry_after_seconds", p, None, 0)
        header = self._bool(obj, "retry_after_header", p, False)
        if header and retry_after is None:
            self._bad(f"{p}retry_after_header", "needs retry_after_seconds")
        return {
            "status": status,
            "retry_after_seconds": retry_after,
            "retry_after_header": header,
            "non_json": self._bool(obj, "non_json", p, False),
            "after_processing": self._bool(obj, "after_processing", p, False),
        }

    def match(self, value: object, path: str) -> Match:
        obj = self._obj(value, path, _MATCH_KEYS)
        p = path + "."
        requests = obj.get("requests")
        req_set: frozenset[int] | None = None
        if requests is not None:
            if not isinstance(requests, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in requests
            ):
                self._bad(f"{p}requests", "must be a list of request numbers (1-based)")
            else:
                req_set = frozenset(requests)
        after = self._num(obj, "after_seconds", p, None, 0.0)
        for_s = self._num(obj, "for_seconds", p, None, 0.0)
        probability = self._num(obj, "probability", p, None, 0.0)
        if probability is not None and probability > 1:
            self._bad(f"{p}probability", "must be between 0 and 1")
        return Match(
            requests=req_set,
            from_n=self._int(obj, "from", p, None, 1),
            to_n=self._int(obj, "to", p, None, 1),
            every=self._int(obj, "every", p, None, 1),
            probability=probability,
            times=self._int(obj, "times", p, None, 0),
            connection_id=self._uuid(obj, "connection_id", p, None),
            after_seconds=after,
            for_seconds=for_s,
        )


def _replace(rule: FaultRule, **changes: Any) -> FaultRule:
    """``dataclasses.replace`` that skips ``None`` values (a problem was already recorded)."""
    values = {key: value for key, value in changes.items() if value is not None}
    if "response_status_code" in changes:  # None is a real value here
        values["response_status_code"] = changes["response_status_code"]
    return FaultRule(**{**rule.__dict__, **values})
