"""The Catena sandbox: real HTTP over loopback against a started server, plus its pure parts."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator

from target_catena_messages.sandbox import Sandbox, SandboxConfig, SandboxConfigError
from target_catena_messages.sandbox.config import FaultPlanConfig, FaultRule, Match
from target_catena_messages.sandbox.faults import FaultPlan, RequestInfo, SlidingWindowLimiter
from target_catena_messages.sandbox.pages import CursorError, paginate
from target_catena_messages.sandbox.schemas import validate_body

ROOT = Path(__file__).resolve().parent.parent
TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"
REVOKE_PATH = "/realms/catena/protocol/openid-connect/revoke"
MESSAGES = "/v2/telematics/messages"
OPS = "/v2/integrations/connections/resource-operations"
USERS = "/v2/telematics/users"
CONN = "0b6f1b7e-3a51-4c1e-9d61-1f0c2b7a9e01"
OTHER_CONN = "7d3e4b2a-9c8f-4e1d-8b6a-5f4e3d2c1b00"
SENDER = "f9c7ee1c-2e16-5858-9b7e-ff7c89a4dd04"
RECIPIENT = "b224f322-b3d2-57e0-b245-cda313f68a1d"
USERS_SEED = [
    {"id": SENDER, "source_id": "disp-1", "connection_id": CONN, "is_driver": False},
    {"id": RECIPIENT, "source_id": "drv-7", "connection_id": CONN, "is_driver": True},
    {
        "id": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
        "source_id": "drv-9",
        "connection_id": OTHER_CONN,
        "is_driver": True,
        "first_name": "Ana",
        "last_name": "Lee",
    },
]
OLD_BODY = {"connection_id": CONN, "source_recipient_ids": ["drv-7"], "message_text": "Load 42"}
NEW_BODY = {
    "connection_id": CONN,
    "sender_id": SENDER,
    "recipient_id": RECIPIENT,
    "message_text": "Delivery confirmed at warehouse B",
    "priority": "low",
}

# -- response shapes of catena-api.md, as JSON Schemas --------------------------------------

UUID = {"type": "string", "format": "uuid"}
DATETIME = {"type": "string", "format": "date-time"}
NULLABLE_STR = {"type": ["string", "null"]}
ERROR_TYPE = {"enum": ["auth", "validation", "network", "tsp", None]}
LOG_READ: dict[str, Any] = {
    "type": "object",
    "required": ["id", "created_at", "updated_at", "resource_operation_id", "status"],
    "properties": {
        "id": UUID,
        "created_at": DATETIME,
        "updated_at": DATETIME,
        "resource_operation_id": UUID,
        "status": {"enum": ["success", "failed"]},
        "error_type": ERROR_TYPE,
        "error_details": NULLABLE_STR,
    },
}
LOG: dict[str, Any] = {
    **LOG_READ,
    "properties": {
        **LOG_READ["properties"],
        "response_status_code": {"type": ["integer", "null"]},
        "response_headers": {
            "type": ["object", "null"],
            "additionalProperties": {"type": "string"},
        },
    },
}
RESOURCE_OPERATION = {
    "type": "object",
    "required": ["connection_id", "operation_type", "partner_id", "payload", "resource", "id"],
    "properties": {
        "id": UUID,
        "created_at": DATETIME,
        "updated_at": DATETIME,
        "deleted_at": {"type": ["string", "null"], "format": "date-time"},
        "partner_id": UUID,
        "connection_id": UUID,
        "resource": {"const": "message"},
        "resource_id": {"type": ["string", "null"], "format": "uuid"},
        "source_id": NULLABLE_STR,
        "operation_type": {"enum": ["create", "update"]},
        "payload": {"type": "object"},
        "status": {"enum": ["pending", "success", "failed"]},
        "logs": {"type": "array", "items": LOG},
    },
}
RESOURCE_OPERATION_READ = {
    "type": "object",
    "required": [
        "id",
        "created_at",
        "updated_at",
        "partner_id",
        "connection_id",
        "source_name",
        "resource",
        "operation_type",
        "status",
        "payload",
    ],
    "properties": {
        "id": UUID,
        "created_at": DATETIME,
        "updated_at": DATETIME,
        "partner_id": UUID,
        "connection_id": UUID,
        "fleet_ref": NULLABLE_STR,
        "source_name": {"type": "string"},
        "resource": {"type": "string"},
        "resource_id": {"type": ["string", "null"], "format": "uuid"},
        "source_id": NULLABLE_STR,
        "operation_type": {"enum": ["create", "update"]},
        "status": {"enum": ["pending", "success", "failed"]},
        "payload": {"type": "object"},
        "logs": {"type": "array", "items": LOG_READ},
    },
}
ACCEPT = {
    "type": "object",
    "required": ["id"],
    "properties": {"id": UUID},
    "additionalProperties": False,
}
ERROR = {
    "type": "object",
    "required": ["code", "message", "detail"],
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "detail": NULLABLE_STR,
    },
    "additionalProperties": False,
}
UNPROCESSABLE = {
    "type": "object",
    "required": ["code", "message", "detail"],
    "properties": {
        "code": {"const": 422},
        "message": {"const": "Invalid Request Body"},
        "detail": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["path", "input", "message", "error_type"],
                "properties": {k: {"type": "string"} for k in ("path", "input", "message")}
                | {"error_type": {"type": "string"}},
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}
TOO_MANY = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"const": 429},
        "message": {"const": "Too Many Requests"},
        "detail": {
            "type": "object",
            "required": ["message", "retry_after_seconds"],
            "properties": {
                "retry_after_seconds": {"type": "integer", "minimum": 0},
                "message": {"type": "string"},
            },
        },
    },
    "additionalProperties": False,
}
INTERNAL = {
    "type": "object",
    "required": ["message"],
    "properties": {"message": {"const": "Internal Server Error"}},
    "additionalProperties": False,
}
CURSOR_KEYS = ["current_page", "current_page_backwards", "previous_page", "next_page"]
OPS_PAGE = {
    "type": "object",
    "required": ["items", *CURSOR_KEYS],
    "properties": {"items": {"type": "array", "items": RESOURCE_OPERATION_READ}}
    | dict.fromkeys(CURSOR_KEYS, NULLABLE_STR),
    "additionalProperties": False,
}
USERS_PAGE = {
    "type": "object",
    "required": ["items", "total", *CURSOR_KEYS],
    "properties": {"items": {"type": "array"}, "total": {"type": "integer"}}
    | dict.fromkeys(CURSOR_KEYS, NULLABLE_STR),
    "additionalProperties": False,
}
TOKEN_RESPONSE = {
    "type": "object",
    "required": ["access_token", "expires_in", "token_type"],
    "properties": {
        "access_token": {"type": "string", "minLength": 20},
        "expires_in": {"type": "integer"},
        "token_type": {"const": "Bearer"},
        "refresh_expires_in": {"type": "integer"},
        "not-before-policy": {"type": "integer"},
        "scope": {"type": "string"},
    },
}
OAUTH_ERROR = {
    "type": "object",
    "required": ["error", "error_description"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
    "additionalProperties": False,
}


def check(instance: Any, schema: dict[str, Any]) -> None:
    """Fail with every schema violation of a response body."""
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


# -- a small client -----------------------------------------------------------------------


class Client:
    """requests.Session bound to one sandbox, with a token fetched on demand."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()
        self._token: str | None = None

    def get_token(self, **form: str) -> requests.Response:
        data = {
            "grant_type": "client_credentials",
            "client_id": "cid",
            "client_secret": "s3cret-value",
            "scope": "organization",
        }
        data.update(form)
        return self.session.post(self.url + TOKEN_PATH, data=data, timeout=5)

    @property
    def token(self) -> str:
        if self._token is None:
            answer = self.get_token()
            assert answer.status_code == 200, answer.text
            self._token = answer.json()["access_token"]
        return self._token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, body: Any = None, params: dict[str, str] | None = None) -> requests.Response:
        body = OLD_BODY if body is None else body
        return self.session.post(
            self.url + MESSAGES, json=body, params=params, headers=self.headers(), timeout=5
        )

    def get(self, path: str, params: Any = None) -> requests.Response:
        return self.session.get(self.url + path, params=params, headers=self.headers(), timeout=5)

    def op(self, op_id: str, conn: str = CONN) -> requests.Response:
        return self.get(f"/v2/integrations/connections/{conn}/resource-operations/{op_id}")


@pytest.fixture
def client(sandbox: Sandbox) -> Client:
    return Client(sandbox.url)


@pytest.fixture
def make(sandbox_factory: Any) -> Any:
    """Start a sandbox with a config and return (sandbox, client)."""

    def _make(config: dict[str, Any] | None = None) -> tuple[Sandbox, Client]:
        box = sandbox_factory(config)
        return box, Client(box.url)

    return _make


def plan(*rules: dict[str, Any], seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {"faults": {"seed": seed, "rules": list(rules)}, **extra}


# -- config ---------------------------------------------------------------------------------


def test_config_defaults_are_a_well_behaved_catena() -> None:
    config = SandboxConfig.from_dict({})
    assert config.message_schema == "source_ids"
    assert config.token_lifetime_seconds == 3600
    assert config.list_lag_seconds == 0
    assert config.rate_limit_per_second is None
    assert config.faults.rules == ()


def test_config_reports_every_problem_with_its_path() -> None:
    bad = {
        "message_schema": "v3",
        "colour": "red",
        "users": [{"id": "nope", "source_id": "x", "connection_id": CONN}],
        "faults": {
            "rules": [
                {"kind": "explode"},
                {"kind": "status", "status": 200},
                {"kind": "status", "status": 429, "retry_after_header": True},
                {"kind": "latency", "ms": -1, "match": {"requests": [0], "probability": 2}},
                {"kind": "sync_fail", "endpoint": "token"},
            ]
        },
    }
    with pytest.raises(SandboxConfigError) as caught:
        SandboxConfig.from_dict(bad)
    text = str(caught.value)
    for fragment in (
        "message_schema",
        "colour: unknown key",
        "users[0].id",
        "faults.rules[0].kind",
        "faults.rules[1].status",
        "faults.rules[2].retry_after_header",
        "faults.rules[3].ms",
        "faults.rules[3].match.requests",
        "faults.rules[3].match.probability",
        "faults.rules[4].endpoint",
    ):
        assert fragment in text, fragment


def test_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.json"
    path.write_text(json.dumps({"message_schema": "catena_ids", "users": USERS_SEED}))
    config = SandboxConfig.from_file(path)
    assert config.message_schema == "catena_ids"
    assert [u.source_id for u in config.users] == ["disp-1", "drv-7", "drv-9"]
    path.write_text("{not json")
    with pytest.raises(SandboxConfigError):
        SandboxConfig.from_file(path)


# -- the fault plan as pure logic ---------------------------------------------------------


def rule(kind: str, **match: Any) -> FaultRule:
    endpoint = match.pop("endpoint", "messages")
    fields = {"from_n": match.pop("from", None), "to_n": match.pop("to", None), **match}
    if "requests" in fields:
        fields["requests"] = frozenset(fields["requests"])
    return FaultRule(kind=kind, endpoint=endpoint, match=Match(**fields), status=503, ms=10)


def fire_sequence(fault_plan: FaultPlan, count: int, **info: Any) -> list[str | None]:
    return [
        fault_plan.decide(
            RequestInfo(info.get("endpoint", "messages"), n, n, **info_extra(info))
        ).label
        for n in range(1, count + 1)
    ]


def info_extra(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "endpoint"}


def test_match_conditions_select_request_numbers() -> None:
    cases = [
        (rule("status", requests=[2, 4]), [2, 4]),
        (rule("status", **{"from": 3, "to": 5}), [3, 4, 5]),
        (rule("status", every=3), [3, 6]),
        (rule("status", every=2, times=2), [2, 4]),
    ]
    for fault_rule, expected in cases:
        fault_plan = FaultPlan(FaultPlanConfig(rules=(fault_rule,)))
        labels = fire_sequence(fault_plan, 7)
        assert [n for n, label in enumerate(labels, 1) if label] == expected, fault_rule


def test_match_connection_time_window_and_endpoint() -> None:
    fault_plan = FaultPlan(
        FaultPlanConfig(
            rules=(
                rule("forbid", connection_id=CONN),
                rule("status", endpoint="token", after_seconds=1.0, for_seconds=2.0),
            )
        )
    )
    assert fault_plan.decide(RequestInfo("messages", 1, 1, CONN)).label == "forbid"
    assert fault_plan.decide(RequestInfo("messages", 2, 2, OTHER_CONN)).label is None
    assert fault_plan.decide(RequestInfo("operations", 1, 3, CONN)).label is None
    windows = [
        fault_plan.decide(RequestInfo("token", 1, 1, elapsed=t)).label for t in (0.5, 1, 2.9, 3)
    ]
    assert windows == [None, "status:503", "status:503", None]


def test_latency_composes_and_first_action_wins() -> None:
    rules = (
        FaultRule(kind="latency", ms=20),
        FaultRule(kind="latency", ms=5, endpoint="any"),
        FaultRule(kind="revoke_tokens", match=Match(requests=frozenset({1}))),
        FaultRule(kind="reset", match=Match(requests=frozenset({1}))),
        FaultRule(kind="status", status=500, match=Match(times=1)),
        FaultRule(kind="sync_fail"),
    )
    fault_plan = FaultPlan(FaultPlanConfig(rules=rules))
    first = fault_plan.decide(RequestInfo("messages", 1, 1))
    assert first.latency_ms == 25
    assert first.revoke_tokens
    assert first.action is not None
    assert first.action.kind == "reset"
    # The status rule did not fire on request 1 (reset won), so its one firing is still left.
    assert (
        fault_plan.decide(RequestInfo("messages", 2, 2)).label
        == "latency:20ms,latency:5ms,status:500"
    )
    assert fault_plan.decide(RequestInfo("messages", 3, 3)).action is None
    sync = fault_plan.decide(RequestInfo("messages", 4, 4, is_sync=True))
    assert sync.action is not None
    assert sync.action.kind == "sync_fail"
    assert fault_plan.decide(RequestInfo("token", 1, 5)).latency_ms == 5
    assert fault_plan.fired() == [4, 5, 1, 1, 1, 1]


def test_seeded_plan_is_deterministic() -> None:
    def sequence(seed: int) -> list[str]:
        rules = (
            FaultRule(kind="status", status=503, match=Match(probability=0.3)),
            FaultRule(kind="latency", ms=1, jitter_ms=50, match=Match(probability=0.5)),
        )
        fault_plan = FaultPlan(FaultPlanConfig(seed=seed, rules=rules))
        out = []
        for n in range(1, 200):
            decision = fault_plan.decide(RequestInfo("messages", n, n))
            out.append(f"{decision.label}:{decision.latency_ms:.6f}")
        return out

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)
    hits = sum("status" in item for item in sequence(7))
    assert 30 < hits < 90  # about 30 % of 199


def test_sliding_window_limiter() -> None:
    limiter = SlidingWindowLimiter(3)
    assert [limiter.admit(t)[0] for t in (0.0, 0.1, 0.2, 0.3)] == [True, True, True, False]
    assert limiter.admit(0.3) == (False, 1)
    assert limiter.admit(1.05)[0] is True  # the request at 0.0 left the window
    assert limiter.admit(1.06)[0] is False


def test_paginate_forward_and_backward() -> None:
    items = [f"i{k}" for k in range(7)]
    keys = list(range(10, 17))
    pages, cursor = [], None
    while True:
        page = paginate(items, keys, cursor, 3)
        pages.append(page.items)
        if page.next_page is None:
            break
        cursor = page.next_page
    assert pages == [["i0", "i1", "i2"], ["i3", "i4", "i5"], ["i6"]]
    assert page.previous_page is not None
    assert paginate(items, keys, page.previous_page, 3).items == ["i3", "i4", "i5"]
    assert paginate(items, keys, page.current_page, 3).items == ["i6"]
    assert paginate(items, keys, None, 3).previous_page is None
    with pytest.raises(CursorError):
        paginate(items, keys, "garbage!", 3)


def test_body_schemas_list_every_error() -> None:
    assert validate_body("source_ids", OLD_BODY) == []
    nulls = dict.fromkeys(["recipient_group", "sender_group", "mode", "priority"]) | OLD_BODY
    assert validate_body("source_ids", nulls) == []
    old = validate_body(
        "source_ids",
        {"mode": "broadcast", "source_recipient_ids": "drv-7", "message_text": 3, "x": 1},
    )
    assert [(d["path"], d["error_type"]) for d in old] == [
        ("connection_id", "missing"),
        ("message_text", "string_type"),
        ("mode", "enum"),
        ("source_recipient_ids", "list_type"),
    ]
    assert validate_body("catena_ids", NEW_BODY | {"priority": None}) == []
    new = validate_body("catena_ids", {"connection_id": CONN, "reply_to_message_id": "r-1"})
    assert [(d["path"], d["error_type"]) for d in new] == [
        ("recipient_id", "missing"),
        ("reply_to_message_id", "uuid_parsing"),
        ("sender_id", "missing"),
    ]


# -- token endpoint -------------------------------------------------------------------------


def test_token_issues_bearer_with_configured_lifetime(make: Any) -> None:
    _, client = make({"token_lifetime_seconds": 120})
    answer = client.get_token()
    assert answer.status_code == 200
    check(answer.json(), TOKEN_RESPONSE)
    assert answer.json()["expires_in"] == 120
    assert answer.headers["Cache-Control"] == "no-store"


def test_token_form_errors(client: Client) -> None:
    cases = [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"scope": "everything"}, 400, "invalid_scope"),
        ({"client_secret": ""}, 401, "invalid_client"),
    ]
    for form, status, error in cases:
        answer = client.get_token(**form)
        assert answer.status_code == status, form
        check(answer.json(), OAUTH_ERROR)
        assert answer.json()["error"] == error
    missing = client.session.post(client.url + TOKEN_PATH, data={"client_id": "a"})
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_request"
    no_scope = client.session.post(
        client.url + TOKEN_PATH,
        data={"grant_type": "client_credentials", "client_id": "a", "client_secret": "b"},
    )
    assert no_scope.status_code == 400
    assert "scope" in no_scope.json()["error_description"]


def test_configured_credentials_reject_wrong_ones(make: Any) -> None:
    _, client = make({"credentials": {"client_id": "cid", "client_secret": "right"}})
    answer = client.get_token(client_secret="wrong")
    assert answer.status_code == 401
    assert answer.json() == {
        "error": "invalid_client",
        "error_description": "Invalid client or Invalid client credentials",
    }
    assert client.get_token(client_secret="right").status_code == 200


def test_revoke_invalidates_the_token(client: Client) -> None:
    assert client.post().status_code == 202
    form = {"token": client.token, "client_id": "cid", "client_secret": "x"}
    assert client.session.post(client.url + REVOKE_PATH, data=form).status_code == 200
    assert client.post().status_code == 401
    bad = client.session.post(client.url + REVOKE_PATH, data={"token": "t", "client_id": "cid"})
    assert bad.status_code == 401


def test_missing_or_expired_token_is_401(make: Any) -> None:
    _, client = make({"token_lifetime_seconds": 0})
    anonymous = client.session.post(client.url + MESSAGES, json=OLD_BODY)
    assert anonymous.status_code == 401
    check(anonymous.json(), ERROR)
    assert anonymous.json()["message"] == "Unauthorized"
    assert client.post().status_code == 401  # lifetime 0: expired at once
    garbage = client.session.post(
        client.url + MESSAGES, json=OLD_BODY, headers={"Authorization": "Bearer nope"}
    )
    assert garbage.status_code == 401


# -- create message: source_ids (older body) ------------------------------------------------


def test_source_ids_accepts_and_records(sandbox: Sandbox, client: Client) -> None:
    body = OLD_BODY | {"fleet_ref": "F1", "mode": None, "zz_extra": True}
    answer = client.post(body)
    assert answer.status_code == 202
    check(answer.json(), ACCEPT)
    op_id = answer.json()["id"]
    [entry] = sandbox.received()
    assert entry["n"] == 1
    assert entry["body"] == body
    assert entry["status"] == 202
    assert entry["operation_id"] == op_id
    assert entry["connection_id"] == CONN
    assert entry["fault"] is None
    assert entry["latency_ms"] == 0
    assert entry["unknown_fields"] == ["zz_extra"]
    assert entry["authorization"] == "Bearer ***"
    assert entry["query"] == {}
    assert sandbox.accepted_bodies() == [body]
    stored = client.op(op_id)
    assert stored.status_code == 200
    check(stored.json(), RESOURCE_OPERATION_READ)
    payload = stored.json()["payload"]
    assert "mode" not in payload
    assert list(payload) == sorted(payload)
    assert stored.json()["fleet_ref"] == "F1"
    assert stored.json()["status"] == "pending"
    stats = sandbox.stats()
    assert stats["accepted"] == 1
    assert stats["operations"] == 1
    assert stats["status_counts"]["messages"] == {"202": 1}


def test_source_ids_invalid_body_lists_every_error(sandbox: Sandbox, client: Client) -> None:
    answer = client.post({"connection_id": "not-a-uuid", "priority": "urgent", "mode": 1})
    assert answer.status_code == 422
    check(answer.json(), UNPROCESSABLE)
    paths = [d["path"] for d in answer.json()["detail"]]
    assert paths == ["connection_id", "mode", "mode", "priority"]  # type and enum for mode
    assert sandbox.stats()["operations"] == 0


def test_non_json_body_is_422(sandbox: Sandbox, client: Client) -> None:
    answer = client.session.post(
        client.url + MESSAGES,
        data=b"<xml/>",
        headers=client.headers() | {"Content-Type": "text/xml"},
    )
    assert answer.status_code == 422
    check(answer.json(), UNPROCESSABLE)
    assert answer.json()["detail"][0]["error_type"] == "json_invalid"
    assert sandbox.received()[0]["body"] == "<xml/>"


# -- create message: catena_ids (current body) ----------------------------------------------


@pytest.fixture
def catena(make: Any) -> tuple[Sandbox, Client]:
    box, client = make({"message_schema": "catena_ids", "users": USERS_SEED})
    return box, client


def test_catena_ids_answers_resource_operation(catena: tuple[Sandbox, Client]) -> None:
    _, client = catena
    answer = client.post(NEW_BODY | {"reply_to_message_id": None})
    assert answer.status_code == 202
    operation = answer.json()
    check(operation, RESOURCE_OPERATION)
    assert operation["status"] == "pending"
    assert operation["resource_id"] is None
    assert operation["logs"] == []
    assert operation["payload"] == dict(
        sorted((NEW_BODY | {"source_sender_id": "disp-1", "source_recipient_id": "drv-7"}).items())
    )
    unknown_recipient = client.post(NEW_BODY | {"recipient_id": str(uuid.uuid4())})
    assert "source_recipient_id" not in unknown_recipient.json()["payload"]


def test_catena_ids_invalid_body_lists_every_error(catena: tuple[Sandbox, Client]) -> None:
    _, client = catena
    answer = client.post(
        {"connection_id": CONN, "sender_id": "drv-7", "priority": "urgent"},
        params={"is_sync": "maybe"},
    )
    assert answer.status_code == 422
    check(answer.json(), UNPROCESSABLE)
    found = {(d["path"], d["error_type"]) for d in answer.json()["detail"]}
    assert found == {
        ("priority", "enum"),
        ("recipient_id", "missing"),
        ("sender_id", "uuid_parsing"),
        ("query.is_sync", "bool_parsing"),
    }


def test_catena_ids_sync_success_and_sync_fail(make: Any) -> None:
    box, client = make(
        plan(
            {"kind": "sync_fail", "match": {"requests": [2]}, "error_type": "validation"},
            message_schema="catena_ids",
        )
    )
    ok = client.post(NEW_BODY, params={"is_sync": "true"})
    assert ok.status_code == 200
    check(ok.json(), RESOURCE_OPERATION)
    assert ok.json()["status"] == "success"
    assert ok.json()["resource_id"]
    assert ok.json()["source_id"]
    failed = client.post(NEW_BODY, params={"is_sync": "true"})
    assert failed.status_code == 502
    check(failed.json(), RESOURCE_OPERATION)
    assert failed.json()["status"] == "failed"
    [log] = failed.json()["logs"]
    assert (log["status"], log["error_type"]) == ("failed", "validation")
    assert log["error_details"]
    assert client.op(failed.json()["id"]).json()["status"] == "failed"
    assert box.received()[1]["fault"] == "sync_fail"


# -- resource operations ----------------------------------------------------------------------


def test_get_operation_404_and_422(client: Client) -> None:
    op_id = client.post().json()["id"]
    for answer in (client.op(str(uuid.uuid4())), client.op(op_id, conn=OTHER_CONN)):
        assert answer.status_code == 404
        check(answer.json(), ERROR)
        assert answer.json()["message"] == "Not Found"
    assert client.op("nope").status_code == 422


def test_list_pages_through_everything_in_order(sandbox: Sandbox, client: Client) -> None:
    ids = [client.post().json()["id"] for _ in range(7)]
    client.post(OLD_BODY | {"connection_id": OTHER_CONN})
    seen, cursor, pages = [], None, 0
    while True:
        params = {"connection_id": CONN, "size": "3", "resource": "message", "operation": "create"}
        if cursor:
            params["cursor"] = cursor
        answer = client.get(OPS, params)
        assert answer.status_code == 200
        check(answer.json(), OPS_PAGE)
        pages += 1
        seen += [item["id"] for item in answer.json()["items"]]
        cursor = answer.json()["next_page"]
        if cursor is None:
            break
    assert seen == ids
    assert pages == 3
    back = client.get(
        OPS, {"connection_id": CONN, "size": "3", "cursor": answer.json()["previous_page"]}
    )
    assert [item["id"] for item in back.json()["items"]] == ids[3:6]
    assert len(client.get(OPS).json()["items"]) == 8


def test_list_time_window_and_parameter_errors(client: Client) -> None:
    client.post()
    future = client.get(
        OPS, {"from_datetime": "2999-01-01T00:00:00Z", "to_datetime": "2999-01-02T00:00:00Z"}
    )
    assert future.status_code == 200
    assert future.json()["items"] == []
    bad_params = [
        {"from_datetime": "2025-01-01T00:00:00Z", "to_datetime": "2025-03-01T00:00:00Z"},
        {"size": "0"},
        {"size": "1001"},
        {"size": "ten"},
        {"cursor": "garbage!"},
        {"resource": "spaceship"},
        {"source_id": "x"},
        {"from_datetime": "yesterday"},
    ]
    for params in bad_params:
        answer = client.get(OPS, params)
        assert answer.status_code == 422, params
        check(answer.json(), UNPROCESSABLE)


def test_list_windows_at_the_ends_of_time_are_answered_not_500(client: Client) -> None:
    client.post()
    # The default window ends a day before to_datetime: a day before year 1 does not exist.
    earliest = client.get(OPS, {"to_datetime": "0001-01-01T00:00:00Z"})
    assert earliest.status_code == 200, earliest.text
    assert earliest.json()["items"] == []
    latest = client.get(
        OPS, {"from_datetime": "9999-12-30T00:00:00Z", "to_datetime": "9999-12-31T23:59:59Z"}
    )
    assert latest.status_code == 200, latest.text
    assert latest.json()["items"] == []
    shifted = client.get(OPS, {"to_datetime": "0001-01-01T00:00:00+14:00"})  # before year 1 in UTC
    assert shifted.status_code == 422
    check(shifted.json(), UNPROCESSABLE)
    assert shifted.json()["detail"][0]["path"] == "query.to_datetime"


def test_token_endpoint_refuses_an_unreadable_form_with_400(client: Client) -> None:
    for content_type in ("multipart/form-data", "multipart/form-data; boundary="):
        answer = client.session.post(
            client.url + TOKEN_PATH, data=b"grant_type=x", headers={"Content-Type": content_type}
        )
        assert answer.status_code == 400, (content_type, answer.text)
        check(answer.json(), OAUTH_ERROR)
        assert answer.json()["error"] == "invalid_request"
    assert client.get_token().status_code == 200  # the server is still serving


def test_list_lag_hides_new_operations_from_list_only(make: Any) -> None:
    _, client = make({"list_lag_seconds": 0.4})
    op_id = client.post().json()["id"]
    assert client.op(op_id).status_code == 200
    assert client.get(OPS).json()["items"] == []
    time.sleep(0.5)
    assert [item["id"] for item in client.get(OPS).json()["items"]] == [op_id]


def test_operations_complete_on_schedule_with_planned_failures(make: Any) -> None:
    box, client = make(
        {
            "operations": {
                "complete_after_seconds": 0.2,
                "fail": {"requests": [2]},
                "error_type": "tsp",
                "error_details": "driver app offline",
            }
        }
    )
    first, second = client.post().json()["id"], client.post().json()["id"]
    assert client.op(first).json()["status"] == "pending"
    time.sleep(0.3)
    done, failed = client.op(first).json(), client.op(second).json()
    assert done["status"] == "success"
    assert done["resource_id"]
    assert done["source_id"]
    assert failed["status"] == "failed"
    assert failed["logs"][-1]["error_details"] == "driver app offline"
    assert failed["updated_at"] > failed["created_at"]
    assert [op["status"] for op in box.operations()] == ["success", "failed"]


def test_complete_operations_on_demand(sandbox: Sandbox, client: Client) -> None:
    ids = [client.post().json()["id"] for _ in range(3)]
    assert sandbox.complete_operations("failed", ids=[ids[0]], error_type="network") == 1
    assert sandbox.complete_operations("failed", ids=[ids[0]]) == 0  # already settled
    answer = client.session.post(
        client.url + "/_sandbox/operations/complete", json={"status": "success"}
    )
    assert answer.json() == {"completed": 2}
    states = {op["id"]: op for op in sandbox.operations()}
    assert states[ids[0]]["status"] == "failed"
    assert states[ids[0]]["logs"][0]["error_type"] == "network"
    assert {states[i]["status"] for i in ids[1:]} == {"success"}
    with pytest.raises(ValueError):
        sandbox.complete_operations("done")


# -- users ----------------------------------------------------------------------------------


def test_users_filters_and_page(make: Any) -> None:
    _, client = make({"users": USERS_SEED})
    everyone = client.get(USERS)
    assert everyone.status_code == 200
    check(everyone.json(), USERS_PAGE)
    assert everyone.json()["total"] == 3
    by_source = client.get(USERS, [("source_ids", "drv-7"), ("source_ids", "drv-9")])
    assert [u["id"] for u in by_source.json()["items"]] == [RECIPIENT, USERS_SEED[2]["id"]]
    drivers_here = client.get(USERS, {"connection_id": CONN, "is_driver": "true"})
    assert [u["source_id"] for u in drivers_here.json()["items"]] == ["drv-7"]
    by_id = client.get(USERS, {"user_ids": SENDER})
    assert by_id.json()["items"][0]["source_id"] == "disp-1"
    page = client.get(USERS, {"size": "2"})
    assert len(page.json()["items"]) == 2
    rest = client.get(USERS, {"size": "2", "cursor": page.json()["next_page"]})
    assert [u["source_id"] for u in rest.json()["items"]] == ["drv-9"]
    assert rest.json()["next_page"] is None


def test_users_items_carry_every_field_the_spec_requires(make: Any) -> None:
    _, client = make({"users": [{**u, "fleet_ref": "PLF"} for u in USERS_SEED]})
    items = client.get(USERS).json()["items"]
    required = ("connection_id", "created_at", "fleet_id", "id", "source_data_hash")
    for item in items:
        for name in (*required, "source_id", "source_name", "updated_at"):
            assert item[name], name
        uuid.UUID(item["fleet_id"])
        assert len(item["source_data_hash"]) == 64
        int(item["source_data_hash"], 16)
        assert "source_data" not in item
    assert {item["source_name"] for item in items} == {"catena_simulator"}
    # One fleet per (connection, fleet_ref); a different user's data, a different hash.
    assert items[0]["fleet_id"] == items[1]["fleet_id"] != items[2]["fleet_id"]
    assert len({item["source_data_hash"] for item in items}) == 3
    with_data = client.get(USERS, {"include_source_data": "true"}).json()["items"]
    assert [item["source_data"]["source_id"] for item in with_data] == ["disp-1", "drv-7", "drv-9"]
    assert [item["source_data_hash"] for item in with_data] == [
        item["source_data_hash"] for item in items
    ]
    by_fleet = client.get(USERS, {"fleet_ids": items[2]["fleet_id"]}).json()["items"]
    assert [item["source_id"] for item in by_fleet] == ["drv-9"]
    newest_first = client.get(USERS, {"sort_order": "desc", "size": "2"}).json()
    assert [item["source_id"] for item in newest_first["items"]] == ["drv-9", "drv-7"]
    rest = client.get(
        USERS, {"sort_order": "desc", "size": "2", "cursor": newest_first["next_page"]}
    )
    assert [item["source_id"] for item in rest.json()["items"]] == ["disp-1"]


def test_users_parameters_are_validated_like_catena(make: Any) -> None:
    _, client = make({"users": USERS_SEED})
    cases = [
        ({"sort_order": "sideways"}, "query.sort_order", "enum"),
        ({"include_source_data": "yes please"}, "query.include_source_data", "bool_parsing"),
        ({"fleet_ids": "PLF"}, "query.fleet_ids.0", "uuid_parsing"),
    ]
    for params, path, error_type in cases:
        answer = client.get(USERS, params)
        assert answer.status_code == 422, params
        check(answer.json(), UNPROCESSABLE)
        assert [(d["path"], d["error_type"]) for d in answer.json()["detail"]] == [
            (path, error_type)
        ]
    everything_wrong = client.get(
        USERS, {k: v for params, _, _ in cases for k, v in params.items()}
    )
    assert len(everything_wrong.json()["detail"]) == 3  # one answer lists every problem


def test_users_more_than_100_ids_is_422(make: Any) -> None:
    _, client = make({"users": USERS_SEED})
    answer = client.get(USERS, [("source_ids", f"d{k}") for k in range(101)])
    assert answer.status_code == 422
    check(answer.json(), UNPROCESSABLE)
    assert answer.json()["detail"][0]["error_type"] == "too_long"
    assert client.get(USERS, [("source_ids", f"d{k}") for k in range(100)]).status_code == 200
    assert client.get(USERS, {"is_driver": "perhaps"}).status_code == 422


# -- faults over HTTP -------------------------------------------------------------------------


def test_reset_aborts_and_stores_nothing(make: Any) -> None:
    box, client = make(plan({"kind": "reset", "match": {"requests": [1]}}))
    with pytest.raises(requests.ConnectionError, match=r"reset by peer"):  # a TCP RST
        client.post()
    assert box.stats()["operations"] == 0
    assert box.accepted_bodies() == []
    [entry] = box.received()
    assert (entry["fault"], entry["status"], entry["operation_id"]) == ("reset", None, None)
    assert client.post().status_code == 202  # the next request is fine
    assert box.stats()["status_counts"]["messages"] == {"reset": 1, "202": 1}


def test_drop_stores_then_closes_without_answer(make: Any) -> None:
    box, client = make(plan({"kind": "drop", "match": {"requests": [1]}}))
    with pytest.raises(requests.ConnectionError, match=r"closed connection without response"):
        client.post()
    [op] = box.operations()
    assert box.accepted_bodies() == [OLD_BODY]
    assert box.received()[0]["operation_id"] == op["id"]
    assert box.stats()["accepted"] == 0
    listed = client.get(OPS, {"connection_id": CONN}).json()["items"]
    assert [item["id"] for item in listed] == [op["id"]]


def test_refuse_closes_the_port_for_the_window(make: Any) -> None:
    # A window long enough that a loaded machine still tries inside it; the test waits only
    # until the port is back, and checks that was not before the window ended.
    window = 3.0
    box, client = make(plan({"kind": "refuse", "seconds": window, "match": {"requests": [2]}}))
    idle = Client(box.url)
    assert idle.post().status_code == 202  # leaves a keep-alive connection open
    started = time.monotonic()
    trigger = client.post()
    assert trigger.status_code == 202  # the triggering request is answered, then the port closes
    assert trigger.headers["Connection"] == "close"
    for session in (client, idle):
        with pytest.raises(requests.ConnectionError, match=r"[Rr]efused"):
            session.post()
    served_again = None
    while served_again is None:
        try:
            answer = client.post()
        except requests.ConnectionError:
            assert time.monotonic() - started < 60 * window, "the port never opened again"
            time.sleep(0.1)
            continue
        served_again = time.monotonic()
        assert answer.status_code == 202
    assert served_again - started >= window  # refused for the whole window
    assert idle.post().status_code == 202


def test_429_with_and_without_retry_after(make: Any) -> None:
    box, client = make(
        plan(
            {
                "kind": "status",
                "status": 429,
                "retry_after_seconds": 7,
                "retry_after_header": True,
                "match": {"requests": [1]},
            },
            {"kind": "status", "status": 429, "match": {"requests": [2]}},
        )
    )
    first = client.post()
    assert first.status_code == 429
    check(first.json(), TOO_MANY)
    assert first.json()["detail"]["retry_after_seconds"] == 7
    assert first.headers["Retry-After"] == "7"
    second = client.post()
    assert second.status_code == 429
    check(second.json(), TOO_MANY)
    assert "detail" not in second.json()
    assert "Retry-After" not in second.headers
    assert box.stats()["operations"] == 0
    assert box.received()[0]["fault"] == "status:429"


def test_server_error_shapes_and_non_json(make: Any) -> None:
    rules = [
        {"kind": "status", "status": s, "match": {"requests": [i]}}
        for i, s in enumerate((500, 502, 503, 504, 400, 409, 501), 1)
    ]
    rules.append({"kind": "status", "status": 502, "non_json": True, "match": {"requests": [8]}})
    _, client = make(plan(*rules))
    first = client.post()
    assert first.status_code == 500
    check(first.json(), INTERNAL)
    for status in (502, 503, 504, 400, 409, 501):
        answer = client.post()
        assert answer.status_code == status
        check(answer.json(), ERROR)
        assert answer.json()["code"] == status
    html = client.post()
    assert html.status_code == 502
    assert html.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        html.json()


def test_status_after_processing_is_ambiguous(make: Any) -> None:
    box, client = make(
        plan(
            {"kind": "status", "status": 504, "after_processing": True, "match": {"requests": [1]}}
        )
    )
    assert client.post().status_code == 504
    assert box.stats()["operations"] == 1


def test_rate_limit_answers_429_with_a_wait(make: Any) -> None:
    box, client = make({"rate_limit_per_second": 3})
    statuses = [client.post().status_code for _ in range(5)]
    assert statuses[:3] == [202, 202, 202]
    assert 429 in statuses[3:]
    limited = client.post()
    assert limited.status_code == 429
    check(limited.json(), TOO_MANY)
    assert limited.json()["detail"]["retry_after_seconds"] >= 1
    time.sleep(1.05)
    assert client.post().status_code == 202
    box.configure({"rate_limit_per_second": 1, "rate_limit_retry_after": False})
    client.post()
    bare = client.post()
    assert bare.status_code == 429
    assert "detail" not in bare.json()


def test_revoke_tokens_fault(make: Any) -> None:
    box, client = make(plan({"kind": "revoke_tokens", "match": {"requests": [2]}}))
    assert client.post().status_code == 202
    assert client.post().status_code == 401  # revoked before it was handled
    assert client.post().status_code == 401
    client._token = None
    assert client.post().status_code == 202  # a token issued after the revocation works
    assert box.received()[1]["fault"] == "revoke_tokens"


def test_forbid_one_connection(make: Any) -> None:
    _, client = make(plan({"kind": "forbid", "match": {"connection_id": OTHER_CONN}}))
    forbidden = client.post(OLD_BODY | {"connection_id": OTHER_CONN})
    assert forbidden.status_code == 403
    check(forbidden.json(), ERROR)
    assert forbidden.json()["message"] == "Forbidden"
    assert client.post().status_code == 202


def test_token_endpoint_faults(make: Any) -> None:
    box, client = make(
        plan(
            {"kind": "status", "status": 503, "endpoint": "token", "match": {"requests": [1]}},
            {"kind": "latency", "ms": 150, "endpoint": "token", "match": {"requests": [2]}},
        )
    )
    failing = client.get_token()
    assert failing.status_code == 503
    check(failing.json(), OAUTH_ERROR)
    started = time.monotonic()
    assert client.get_token().status_code == 200
    assert time.monotonic() - started >= 0.15
    assert box.stats()["token_requests"] == 2


def test_latency_is_applied_and_in_flight_peaks(make: Any) -> None:
    box, client = make(plan({"kind": "latency", "ms": 250}))
    client.post()  # fetch the token outside the measured part
    results: list[int] = []

    def send() -> None:
        results.append(
            Client(box.url)
            .session.post(box.url + MESSAGES, json=OLD_BODY, headers=client.headers(), timeout=5)
            .status_code
        )

    threads = [threading.Thread(target=send) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert results == [202] * 8
    assert elapsed >= 0.25
    assert box.stats()["peak_in_flight"] == 8
    assert box.stats()["in_flight"] == 0
    assert {entry["fault"] for entry in box.received()} == {"latency:250ms"}
    assert {entry["latency_ms"] for entry in box.received()} == {250}


def test_introspection_is_consistent_while_serving(make: Any) -> None:
    box, client = make()
    headers = client.headers()
    errors: list[BaseException] = []

    def send() -> None:
        session = requests.Session()
        try:
            for _ in range(25):
                answer = session.post(box.url + MESSAGES, json=OLD_BODY, headers=headers, timeout=5)
                assert answer.status_code == 202
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    seen = 0
    while any(thread.is_alive() for thread in threads):
        received, stats = box.received(), box.stats()
        assert len(received) >= seen  # never shrinks, never half-written
        seen = len(received)
        assert all(entry["at"] for entry in received)
        assert stats["in_flight"] >= 0
        box.operations()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(box.received()) == 100
    assert box.stats()["accepted"] == 100
    assert len({entry["operation_id"] for entry in box.received()}) == 100


def test_endpoint_any_counts_all_requests(make: Any) -> None:
    _, client = make(
        plan({"kind": "status", "status": 503, "endpoint": "any", "match": {"requests": [3]}})
    )
    assert client.get_token().status_code == 200  # request 1
    client._token = client.get_token().json()["access_token"]  # request 2
    assert client.post().status_code == 503  # request 3


def test_same_seed_same_fault_sequence_over_http(make: Any) -> None:
    def run(seed: int) -> list[int | str]:
        _, client = make(
            plan(
                {"kind": "status", "status": 503, "match": {"probability": 0.3}},
                {"kind": "status", "status": 500, "match": {"probability": 0.2}},
                seed=seed,
            )
        )
        return [client.post().status_code for _ in range(30)]

    first, again, other = run(11), run(11), run(12)
    assert first == again
    assert first != other
    assert set(first) == {202, 500, 503}


# -- control and introspection ------------------------------------------------------------------


def test_configure_and_reset(sandbox: Sandbox, client: Client) -> None:
    client.post()
    sandbox.configure(plan({"kind": "status", "status": 503, "match": {"requests": [1]}}))
    assert client.post().status_code == 503  # numbering restarted: this is request 1 again
    assert sandbox.stats()["operations"] == 1  # configure keeps what was received
    sandbox.reset()
    assert sandbox.received() == []
    assert sandbox.stats()["operations"] == 0
    assert sandbox.stats()["requests"] == {}
    assert client.post().status_code == 503  # reset restarts numbering as well, token still valid


def test_http_control_endpoints(sandbox: Sandbox, client: Client) -> None:
    client.post()
    session, url = client.session, sandbox.url
    assert len(session.get(url + "/_sandbox/received").json()) == 1
    assert session.get(url + "/_sandbox/stats").json()["accepted"] == 1
    assert len(session.get(url + "/_sandbox/operations").json()) == 1
    assert session.get(url + "/_sandbox/accepted_bodies").json() == [OLD_BODY]
    bad = session.post(url + "/_sandbox/config", json={"faults": {"rules": [{"kind": "boom"}]}})
    assert bad.status_code == 400
    assert "faults.rules[0].kind" in bad.json()["detail"]
    good = session.post(url + "/_sandbox/config", json={"message_schema": "catena_ids"})
    assert good.status_code == 200
    assert sandbox.config.message_schema == "catena_ids"
    assert session.post(url + "/_sandbox/reset").status_code == 200
    assert sandbox.received() == []


def test_unknown_route_and_method_use_json_envelopes(client: Client) -> None:
    missing = client.session.get(client.url + "/v2/nothing")
    assert missing.status_code == 404
    check(missing.json(), ERROR)
    wrong_method = client.session.get(client.url + MESSAGES)
    assert wrong_method.status_code == 405
    check(wrong_method.json(), ERROR)
    assert "POST" in wrong_method.headers["Allow"]


def test_tokens_and_secrets_never_leak(make: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    box, client = make(plan({"kind": "reset", "match": {"requests": [2]}}))
    client.post()
    with pytest.raises(requests.ConnectionError):
        client.post()
    client.post({"connection_id": "x"})
    tokens = box.stats()["tokens_issued"]
    assert tokens == [client.token]
    exposed = json.dumps(box.received()) + json.dumps(box.operations()) + caplog.text
    exposed += client.session.get(box.url + "/_sandbox/received").text
    for secret in [*tokens, "s3cret-value"]:
        assert secret not in exposed


def test_sandbox_fixture_and_restart() -> None:
    box = Sandbox()
    with pytest.raises(RuntimeError):
        _ = box.url
    url = box.start()
    assert url.startswith("http://127.0.0.1:")
    assert box.start() == url  # idempotent
    box.stop()
    box.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/_sandbox/stats", timeout=2)
    assert box.start() == url  # same port again
    box.stop()


def test_cli_prints_url_first_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"message_schema": "catena_ids"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "target_catena_messages.sandbox", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        client = Client(url)
        assert client.post(NEW_BODY).status_code == 202
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0
    assert out == ""  # nothing but the URL on stdout
    assert client.token not in err


def test_cli_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"faults": {"rules": [{"kind": "nope"}]}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "target_catena_messages.sandbox", "--config", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=20, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "faults.rules[0].kind" in done.stderr


def test_random_bodies_never_crash_the_server(client: Client) -> None:
    rng = random.Random(5)
    values: list[Any] = [None, 1, "x", [], {}, CONN, ["a"], True, 1.5]
    keys = [*OLD_BODY, "mode", "priority", "recipient_group", "other"]
    for _ in range(60):
        body = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 5))}
        answer = client.post(body)
        assert answer.status_code in (202, 422), (body, answer.text)
        if answer.status_code == 422:
            check(answer.json(), UNPROCESSABLE)
