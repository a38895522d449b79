"""Query parameters of the list endpoints: parsing, validation into 422 details, filters.

Catena's list endpoints are FastAPI: a bad parameter is a 422 naming ``query.<name>``, id filters
take at most 100 values (repeat the key), time windows default to the last day and may span at
most 45 days. Every parser appends problems to a shared list so one answer lists all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from target_catena_messages.sandbox.config import is_uuid
from target_catena_messages.sandbox.schemas import detail

MAX_WINDOW = timedelta(days=45)
MAX_IDS = 100
# ResourceEnum of the SDK plus fleet_info from the live docs.
# fmt: off
RESOURCES = frozenset((
    "asset", "driver_association", "driver_vehicle_association", "driver_event_log",
    "driver_safety_event", "dvir_log", "dvir_log_defect", "engine_log", "engine_status",
    "fuel_transaction", "fleet_info", "hos_availability", "hos_daily_snapshot", "hos_event",
    "hos_event_annotation", "hos_event_attachment", "hos_violation", "ifta_summary",
    "location_segment", "message", "group_message", "user", "vehicle", "vehicle_location",
    "vehicle_sensor", "vehicle_region_segment", "trailer", "trailer_association",
    "trailer_vehicle_association", "trailer_location", "trailer_status", "workflow",
))
# fmt: on
Details = list[dict[str, str]]


def many(query: Any, name: str, details: Details, uuids: bool = False) -> set[str] | None:
    """A repeatable filter (``?k=a&k=b``) of at most 100 values; None when absent."""
    values: list[str] = query.getall(name, [])
    if not values:
        return None
    if len(values) > MAX_IDS:
        message = f"List should have at most {MAX_IDS} items after validation, not {len(values)}"
        details.append(detail(f"query.{name}", values, message, "too_long"))
    for i, value in enumerate(values):
        if uuids and not is_uuid(value):
            details.append(
                detail(f"query.{name}.{i}", value, "Input should be a valid UUID", "uuid_parsing")
            )
    return set(values)


def one_uuid(query: Any, name: str, details: Details) -> str | None:
    """A single UUID parameter; None when absent."""
    value: str | None = query.get(name)
    if value is not None and not is_uuid(value):
        details.append(
            detail(f"query.{name}", value, "Input should be a valid UUID", "uuid_parsing")
        )
    return value


def bool_param(query: Any, name: str, details: Details) -> bool | None:
    """``true``/``false`` (any case); None when absent."""
    value: str | None = query.get(name)
    if value is None:
        return None
    if value.lower() not in ("true", "false"):
        details.append(
            detail(f"query.{name}", value, "Input should be a valid boolean", "bool_parsing")
        )
        return None
    return value.lower() == "true"


def sort_order(query: Any, details: Details) -> str:
    """``sort_order``: ``asc`` (the default) or ``desc``, as Catena's SortOrderEnum."""
    value: str = query.get("sort_order", "asc")
    if value not in ("asc", "desc"):
        details.append(detail("query.sort_order", value, "Input should be 'asc' or 'desc'", "enum"))
        return "asc"
    return value


def page_size(query: Any, details: Details) -> int:
    """``size``: 1..1000, default 300."""
    text: str = query.get("size", "300")
    try:
        size = int(text)
    except ValueError:
        details.append(detail("query.size", text, "Input should be a valid integer", "int_parsing"))
        return 300
    if size < 1:
        details.append(
            detail(
                "query.size",
                text,
                "Input should be greater than or equal to 1",
                "greater_than_equal",
            )
        )
    elif size > 1000:
        details.append(
            detail(
                "query.size", text, "Input should be less than or equal to 1000", "less_than_equal"
            )
        )
    return size


def _datetime(query: Any, name: str, default: datetime, details: Details) -> datetime:
    text: str | None = query.get(name)
    if text is None:
        return default
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        # In UTC, so that window arithmetic cannot leave datetime's range later on.
        return (
            value.astimezone(timezone.utc)
            if value.tzinfo is not None
            else value.replace(tzinfo=timezone.utc)
        )
    except (ValueError, OverflowError):
        details.append(
            detail(f"query.{name}", text, "Input should be a valid datetime", "datetime_parsing")
        )
        return default


@dataclass(frozen=True)
class OperationFilters:
    """The LIST resource-operations filters, parsed."""

    connection_id: str | None
    resource: str | None
    operation: str | None
    source_name: str | None
    source_id: str | None
    fleet_refs: set[str] | None
    start: datetime
    end: datetime


def operation_filters(query: Any, now: datetime, details: Details) -> OperationFilters:
    """Parse every LIST resource-operations filter (window defaults: the last day)."""
    end = _datetime(query, "to_datetime", now, details)
    # A day before the earliest datetime does not exist: the window then starts at the minimum.
    earliest = datetime.min.replace(tzinfo=timezone.utc)
    day_before = end - timedelta(days=1) if end - earliest > timedelta(days=1) else earliest
    start = _datetime(query, "from_datetime", day_before, details)
    if end - start > MAX_WINDOW:
        details.append(
            detail(
                "query",
                f"{start.isoformat()}..{end.isoformat()}",
                "to_datetime - from_datetime must be at most 45 days",
                "value_error",
            )
        )
    resource = query.get("resource")
    if resource is not None and resource not in RESOURCES:
        details.append(
            detail("query.resource", resource, "Input should be a valid ResourceEnum", "enum")
        )
    operation = query.get("operation")
    if operation is not None and operation not in ("create", "update"):
        details.append(
            detail("query.operation", operation, "Input should be 'create' or 'update'", "enum")
        )
    source_id = query.get("source_id")
    if source_id is not None and resource is None:
        details.append(
            detail("query.source_id", source_id, "source_id requires resource", "value_error")
        )
    return OperationFilters(
        connection_id=one_uuid(query, "connection_id", details),
        resource=resource,
        operation=operation,
        source_name=query.get("source_name"),
        source_id=source_id,
        fleet_refs=many(query, "fleet_refs", details),
        start=start,
        end=end,
    )


def operation_matches(op: dict[str, Any], f: OperationFilters, created: datetime) -> bool:
    """Whether an operation (ResourceOperationRead fields) passes the filters."""
    return (
        f.start <= created <= f.end
        and (f.connection_id is None or op["connection_id"] == f.connection_id)
        and (f.resource is None or op["resource"] == f.resource)
        and (f.operation is None or op["operation_type"] == f.operation)
        and (f.source_name is None or op["source_name"] == f.source_name)
        and (f.source_id is None or op["source_id"] == f.source_id)
        and (f.fleet_refs is None or op["fleet_ref"] in f.fleet_refs)
    )
