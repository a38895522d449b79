"""Write a realistic TMS extract of dispatch messages as a Singer stream, deterministically.

The output looks like what tap-postgres emits for a ``dispatch_messages`` table replicated
incrementally on ``updated_at``: one SCHEMA, RECORDs in ``updated_at`` order, a STATE bookmark
every 50 records. Three fleets talk with their drivers about loads (appointments, docks,
detention, reroutes, hours of service, breakdowns, paperwork), with driver replies threaded under
dispatcher messages, one group announcement and one bulk notice. Nine rows are planted that the
target must dead-letter (see ``sample_data/README.md``).

Stdlib only, so it runs before the package is installed::

    python sample_data/make_sample.py --now 2026-11-27T15:00:00Z --out output/sample.singer

The same ``--now`` always gives the same bytes: every time is an offset from ``--now`` and all
randomness comes from one seeded generator.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

STREAM = "public-dispatch_messages"
SEED = 20261127
VALID_MESSAGES = 291
STATE_EVERY = 50
FIRST_MESSAGE_ID = 48201


@dataclass(frozen=True)
class Fleet:
    """A carrier whose drivers get messages through one Catena connection."""

    ref: str
    name: str
    connection_id: str | None  # None: resolved by the target via connection_id_by_fleet_ref
    hub: str
    dispatchers: tuple[str, ...]
    drivers: tuple[tuple[str, str, str], ...]  # (source id, first name, last name)


FLEETS = (
    Fleet(
        "PLF",
        "Prairie Line Freight",
        "3b6f7f2e-5d0a-4c1b-9f8e-2a7c4d9e1b10",
        "Omaha, NE",
        ("PLF-DSP-01", "PLF-DSP-02"),
        (
            ("PLF-D1041", "Marcus", "Hale"),
            ("PLF-D1042", "Rosa", "Delgado"),
            ("PLF-D1047", "Tom", "Brandt"),
            ("PLF-D1053", "Keisha", "Monroe"),
            ("PLF-D1058", "Dale", "Svoboda"),
            ("PLF-D1060", "Andre", "Whitfield"),
            ("PLF-D1066", "Linda", "Okafor"),
            ("PLF-D1071", "Greg", "Lindqvist"),
            ("PLF-D1079", "Javier", "Soto"),
        ),
    ),
    Fleet(
        "BRC",
        "Blue Ridge Carriers",
        "8d2e4c6a-1f3b-4a5d-8c7e-9b0a1d2c3e41",
        "Roanoke, VA",
        ("BRC-DSP-07",),
        (
            ("BRC-2201", "Earl", "Puckett"),
            ("BRC-2204", "Tanya", "Greer"),
            ("BRC-2209", "Ray", "Mullins"),
            ("BRC-2213", "Denise", "Carver"),
            ("BRC-2217", "Luis", "Ortega"),
            ("BRC-2220", "Shawn", "Tolliver"),
            ("BRC-2226", "Amy", "Blevins"),
            ("BRC-2231", "Curtis", "Boone"),
        ),
    ),
    Fleet(
        "GCH",
        "Gulf Coast Haulers",
        None,
        "Houston, TX",
        ("GCH-OPS-3", "GCH-OPS-5"),
        (
            ("GCH-0311", "Hector", "Villarreal"),
            ("GCH-0318", "Brandy", "Thibodeaux"),
            ("GCH-0322", "Dwayne", "Guidry"),
            ("GCH-0327", "Maria", "Cantu"),
            ("GCH-0330", "Trent", "Fontenot"),
            ("GCH-0334", "Yolanda", "Reyes"),
            ("GCH-0341", "Bobby", "Landry"),
            ("GCH-0345", "Kim", "Nguyen"),
        ),
    ),
)
GCH_CONNECTION_ID = "c5a1e9d7-2b4f-4e6a-a8c0-7d3f5b9e1a62"
"""Gulf Coast Haulers' connection, only in the target config's ``connection_id_by_fleet_ref``."""

UNMAPPED_FLEET = Fleet(
    "NWX",
    "Northwest Express",
    None,
    "Spokane, WA",
    ("NWX-DSP-1",),
    (("NWX-501", "Carl", "Jensen"), ("NWX-507", "Dana", "Pryor")),
)
"""A fleet just onboarded in the TMS, not yet connected in Catena: its rows have no connection."""

# Each fleet runs lanes in its own region: shippers/receivers and roads it would really meet.
SHIPPERS: dict[str, tuple[tuple[str, str], ...]] = {
    "PLF": (
        ("Heartland Grain Co-op", "Grand Island, NE"),
        ("Summit Foods DC", "Des Moines, IA"),
        ("Lakeside Paper", "Green Bay, WI"),
        ("Riverbend Steel", "Granite City, IL"),
        ("Gateway Auto Parts", "St. Louis, MO"),
        ("Prairie Pet Food plant", "Sioux City, IA"),
    ),
    "BRC": (
        ("Coastal Cold Storage", "Savannah, GA"),
        ("Pioneer Plastics", "Lynchburg, VA"),
        ("Maple Ridge Lumber", "Hickory, NC"),
        ("Keystone Beverage DC", "Harrisburg, PA"),
        ("Piedmont Furniture", "High Point, NC"),
        ("Shenandoah Poultry", "Harrisonburg, VA"),
    ),
    "GCH": (
        ("Bayou Chemical terminal", "Baton Rouge, LA"),
        ("Lone Star Produce", "Pharr, TX"),
        ("Bayport Container Yard", "Pasadena, TX"),
        ("Gulf Resin Works", "Lake Charles, LA"),
        ("Brazos Building Supply", "Bryan, TX"),
        ("Crescent Coffee Roasters", "New Orleans, LA"),
    ),
}
ROADS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "PLF": (
        ("I-80", "mile 312 near Kearney", "US-30"),
        ("I-29", "mile 75 near Onawa", "IA-175 to US-75"),
        ("I-35", "the Ankeny exits", "US-65"),
    ),
    "BRC": (
        ("I-81", "exit 150 near Troutville", "US-11"),
        ("I-77", "Fancy Gap", "US-52"),
        ("I-85", "exit 96 near Lexington", "US-29"),
    ),
    "GCH": (
        ("I-10", "the Atchafalaya bridge", "US-190"),
        ("I-45", "exit 64 near Conroe", "TX-75"),
        ("US-59", "the Rosenberg overpass", "TX-36 to I-10"),
    ),
}
TRUCK_STOPS = ("Love's", "Pilot", "TA", "Flying J", "Petro", "Kwik Trip")


@dataclass
class Message:
    """One row of ``dispatch_messages`` before ids are assigned."""

    fleet: Fleet
    created: datetime
    text: str
    sender: str
    sender_group: str
    recipients: list[str] | None
    recipient_group: str
    mode: str = "direct"
    priority: str | None = "medium"
    load: str | None = None
    thread: str | None = None
    reply_to: Message | None = None
    updated: datetime | None = None
    connection_override: str | None = field(default=None)
    message_id: int = 0

    def record(self) -> dict[str, Any]:
        """The TMS row as the tap emits it (columns named as the Catena body wants them)."""
        updated = self.updated or self.created
        return {
            "message_id": self.message_id,
            "load_number": self.load,
            "connection_id": self.connection_override or self.fleet.connection_id,
            "fleet_ref": self.fleet.ref,
            "source_sender_id": self.sender,
            "source_recipient_ids": self.recipients,
            "recipient_group": self.recipient_group,
            "sender_group": self.sender_group,
            "message_text": self.text,
            "mode": self.mode,
            "priority": self.priority,
            "source_thread_id": self.thread,
            "source_reply_to_message_id": (
                str(self.reply_to.message_id) if self.reply_to is not None else None
            ),
            "created_at": _iso(self.created),
            "updated_at": _iso(updated),
        }


@dataclass(frozen=True)
class Party:
    """Who talks in one exchange: a driver and a dispatcher of one fleet, maybe about a load."""

    fleet: Fleet
    driver: str
    dispatcher: str
    load: str | None = None

    def say(
        self, role: str, at: datetime, text: str, priority: str | None, earlier: list[Message]
    ) -> Message:
        """One direct message from ``role`` to the other side, threaded under ``earlier``."""
        from_driver = role == "driver"
        return Message(
            fleet=self.fleet,
            created=at,
            text=text,
            sender=self.driver if from_driver else self.dispatcher,
            sender_group=role,
            recipients=[self.dispatcher if from_driver else self.driver],
            recipient_group="dispatcher" if from_driver else "driver",
            priority=priority,
            load=self.load,
            thread=f"thr-{self.load}" if self.load else None,
            reply_to=earlier[-1] if earlier else None,
        )


class Conversations:
    """Builds believable dispatcher/driver exchanges with one seeded random generator."""

    def __init__(self, rng: random.Random, now: datetime) -> None:
        self.rng = rng
        self.now = now
        self.latest = now - timedelta(minutes=1)

    def _start(self) -> datetime:
        minutes = self.rng.randint(20, 9 * 60)
        return self.now - timedelta(minutes=minutes, seconds=self.rng.randint(0, 59))

    def _later(self, at: datetime, low: int = 3, high: int = 45) -> datetime:
        return at + timedelta(minutes=self.rng.randint(low, high), seconds=self.rng.randint(0, 59))

    def _party(self, fleet: Fleet, with_load: bool) -> Party:
        driver = self.rng.choice(fleet.drivers)[0]
        dispatcher = self.rng.choice(fleet.dispatchers)
        load = f"{fleet.ref}-{self.rng.randint(100000, 999999)}" if with_load else None
        return Party(fleet, driver, dispatcher, load)

    def _clock(self, at: datetime, hours_ahead: int) -> str:
        slot = at + timedelta(hours=hours_ahead)
        return f"{slot:%H}{self.rng.choice(('00', '15', '30', '45'))}"

    def thread(self, fleet: Fleet) -> list[Message]:
        """A load conversation: assignment, driver reply, then a few follow-ups."""
        rng = self.rng
        party = self._party(fleet, with_load=True)
        load = party.load
        (shipper, origin), (receiver, dest) = rng.sample(SHIPPERS[fleet.ref], 2)
        at = self._start()
        steps = [
            (
                "dispatcher",
                f"Load {load}: pick up at {shipper}, {origin}, appt {self._clock(at, 2)}. "
                f"Deliver {receiver}, {dest}, appt {self._clock(at, 20)} tomorrow. "
                f"PO {rng.randint(4500000, 4599999)}.",
                rng.choice(("medium", "high", "medium")),
            ),
            ("driver", rng.choice(DRIVER_ACKS).format(shipper=shipper), "low"),
            (
                "dispatcher",
                f"Dock {rng.randint(1, 48)} at {shipper}. Check in at the shipping office, "
                f"seal #{rng.randint(1000000, 9999999)}.",
                "medium",
            ),
            ("driver", rng.choice(DRIVER_UPDATES).format(receiver=receiver), "low"),
            ("dispatcher", rng.choice(DISPATCH_FOLLOWUPS).format(load=load, dest=dest), None),
        ]
        length = rng.choice((2, 2, 3, 3, 4, 5))
        messages: list[Message] = []
        for role, text, priority in steps[:length]:
            if messages:
                at = self._later(at)
            if at >= self.latest:
                break
            messages.append(party.say(role, at, text, priority, messages))
        return messages

    def one_off(self, fleet: Fleet) -> list[Message]:
        """A standalone notice with an optional reply (HOS, reroute, detention, ...)."""
        rng = self.rng
        kind, template, priority, reply = rng.choice(ONE_OFFS)
        party = self._party(fleet, with_load=kind in ("detention", "reroute", "pod"))
        road, place, detour = rng.choice(ROADS[fleet.ref])
        values = {
            "road": road,
            "place": place,
            "detour": detour,
            "hours": rng.randint(1, 4),
            "minutes": rng.choice((10, 20, 35, 45)),
            "city": rng.choice(SHIPPERS[fleet.ref])[1],
            "stop": rng.choice(TRUCK_STOPS),
            "unit": rng.randint(300, 899),
            "since": self._clock(self.now, -rng.randint(2, 4)),
            "receiver": rng.choice(SHIPPERS[fleet.ref])[0],
            "load": party.load,
        }
        at = self._start()
        role = "driver" if kind in ("detention", "breakdown") else "dispatcher"
        messages = [party.say(role, at, template.format(**values), priority, [])]
        later = self._later(at, 2, 20)
        if reply and later < self.latest:
            back = "dispatcher" if role == "driver" else "driver"
            messages.append(party.say(back, later, reply.format(**values), "low", messages))
        return messages


DRIVER_ACKS = (
    "10-4, headed to {shipper} now.",
    "Got it. ETA 45 min.",
    "Copy. I only have about 6 hours left on my clock, can we push the delivery appt?",
    "Received. Trailer number?",
    "On it. Fueling first, then rolling.",
    "10-4",
)
DRIVER_UPDATES = (
    "Loaded and sealed, heading out.",
    "Shipper says 2 more hours before they load me. Starting detention clock?",
    "Loaded 22 pallets, BOL says 24. Want me to wait or roll?",
    "Loaded. Is the {receiver} appt still good for tomorrow?",
    "Heavy traffic leaving the yard, running 30 min behind. Can you let the receiver know?",
)
DISPATCH_FOLLOWUPS = (
    "Receiver moved your appt for {load} to 0700. No rush tonight.",
    "Receiver in {dest} knows you're running late, they'll hold the door.",
    "Next load is a preload in {dest}, details in the morning.",
    "Please scan the BOL for {load} when you're empty.",
    "Good work. Take your 10 after delivery.",
)
ONE_OFFS = (
    (
        "hos",
        "HOS check: about {hours}h{minutes} left on your 11. Plan your 30-min break before {city}.",
        "low",
        "Copy, stopping at the next {stop}.",
    ),
    (
        "reroute",
        "Reroute on {load}: {road} closed at {place} after a wreck. Take {detour} instead.",
        "high",
        "Got it, taking {detour}.",
    ),
    ("fuel", "Fuel at the {stop} in {city} today, fleet card only. Top off tanks.", "low", None),
    (
        "detention",
        "{load}: still waiting at {receiver}, here since {since}. No door assigned yet.",
        "medium",
        "Logged detention from {since}. Customer pays after 2 hours free.",
    ),
    (
        "breakdown",
        "Check engine light on unit {unit}, losing power. Pulled over on {road} at {place}.",
        "high",
        "Calling roadside now. Stay with the truck, tech ETA about an hour.",
    ),
    (
        "pod",
        "Please send the POD for {load} before end of day. Payroll closes at 1700.",
        "low",
        "Sent. Receiver noted 2 pallets short on the BOL.",
    ),
    (
        "safety",
        "Reminder: pre-trip inspection photos in the app before you leave the yard.",
        None,
        None,
    ),
)


def broadcasts(now: datetime) -> list[Message]:
    """One group announcement to every driver of a fleet and one bulk notice to a few drivers."""
    plf, brc = FLEETS[0], FLEETS[1]
    group = Message(
        fleet=plf,
        created=now - timedelta(hours=5, minutes=12),
        text=(
            "All drivers: winter storm warning on I-80 from Cheyenne to Laramie tonight. "
            "Chain law in effect. Call dispatch before you cross, safety first."
        ),
        sender=plf.dispatchers[0],
        sender_group="dispatcher",
        recipients=None,
        recipient_group="driver",
        mode="group",
        priority="high",
    )
    bulk = Message(
        fleet=brc,
        created=now - timedelta(hours=3, minutes=40),
        text="ELD update tonight 0100-0200, tablets will reboot. Log off before 0100.",
        sender=brc.dispatchers[0],
        sender_group="dispatcher",
        recipients=[d[0] for d in brc.drivers[:4]],
        recipient_group="driver",
        mode="bulk",
        priority="low",
    )
    return [group, bulk]


def dead_letter_rows(rng: random.Random, now: datetime) -> list[Message]:
    """The nine rows the demo must dead-letter, each wrong in exactly one way."""
    plf, brc, gch = FLEETS

    def direct(fleet: Fleet, text: str, ago_minutes: int, **extra: Any) -> Message:
        driver = rng.choice(fleet.drivers)[0]
        return Message(
            fleet=fleet,
            created=now - timedelta(minutes=ago_minutes, seconds=rng.randint(0, 59)),
            text=text,
            sender=fleet.dispatchers[0],
            sender_group="dispatcher",
            recipients=[driver],
            recipient_group="driver",
            **extra,
        )

    nwx = UNMAPPED_FLEET
    three_days = 3 * 24 * 60
    return [
        # 2 x priority outside Catena's enum (the TMS has an "urgent" level Catena lacks)
        direct(plf, "Call me ASAP, receiver rejected the trailer on temp.", 95, priority="urgent"),
        direct(
            gch, "Customer is on the phone about the short load. Call now.", 44, priority="urgent"
        ),
        # 2 x fleet with no Catena connection yet (not in connection_id_by_fleet_ref)
        direct(nwx, "Welcome aboard! Orientation packet is in the app.", 130),
        direct(nwx, "Your first load is ready, call dispatch for details.", 61),
        # 2 x blank text (sent from the TMS with an empty box)
        direct(brc, "", 212),
        direct(gch, "   ", 33),
        # 2 x created three days ago (stuck in an outbox, touched again today): too old to send
        direct(plf, "Reminder: safety meeting Friday 0800 at the Omaha yard.", three_days),
        direct(brc, "Your load for Monday is confirmed, details to follow.", three_days + 7),
        # 1 x connection id typed in by hand, cut short
        direct(
            brc,
            "Trailer 5312 needs its annual inspection this week.",
            150,
            connection_override="8d2e4c6a-1f3b-4a5d-8c7e",
        ),
    ]


def build_messages(now: datetime) -> list[Message]:
    """All rows, ids assigned in creation order, sorted as the tap emits them."""
    rng = random.Random(SEED)
    conv = Conversations(rng, now)
    valid = broadcasts(now)
    while len(valid) < VALID_MESSAGES:
        fleet = rng.choice(FLEETS)
        valid += conv.thread(fleet) if rng.random() < 0.6 else conv.one_off(fleet)
    # Cutting the tail drops only the last replies of the last exchange, never a message replied to.
    messages = valid[:VALID_MESSAGES] + dead_letter_rows(rng, now)
    for message in messages:
        if message.updated is None:
            message.updated = message.created + timedelta(seconds=rng.randint(0, 5))
        if message.created < now - timedelta(hours=24):
            message.updated = now - timedelta(minutes=rng.randint(20, 90))
    for number, message in enumerate(sorted(messages, key=lambda m: m.created)):
        message.message_id = FIRST_MESSAGE_ID + number
    return sorted(messages, key=lambda m: (m.updated or m.created, m.message_id))


def schema_message() -> dict[str, Any]:
    """The SCHEMA message, typed like tap-postgres types these columns."""
    text = {"type": ["string", "null"]}
    stamp = {"type": ["string", "null"], "format": "date-time"}
    properties: dict[str, Any] = {
        "message_id": {"type": ["integer"]},
        "load_number": text,
        "connection_id": text,
        "fleet_ref": text,
        "source_sender_id": text,
        "source_recipient_ids": {"type": ["array", "null"], "items": {"type": "string"}},
        "recipient_group": text,
        "sender_group": text,
        "message_text": text,
        "mode": text,
        "priority": text,
        "source_thread_id": text,
        "source_reply_to_message_id": text,
        "created_at": stamp,
        "updated_at": stamp,
    }
    return {
        "type": "SCHEMA",
        "stream": STREAM,
        "schema": {"type": "object", "properties": properties},
        "key_properties": ["message_id"],
        "bookmark_properties": ["updated_at"],
    }


def singer_lines(now: datetime) -> list[str]:
    """The whole stream, one JSON message a line."""
    lines = [schema_message()]
    extracted = _iso(now)
    messages = build_messages(now)
    for count, message in enumerate(messages, start=1):
        record = message.record()
        lines.append(
            {"type": "RECORD", "stream": STREAM, "record": record, "time_extracted": extracted}
        )
        if count % STATE_EVERY == 0 or count == len(messages):
            bookmark = {
                "replication_key": "updated_at",
                "replication_key_value": record["updated_at"],
            }
            lines.append({"type": "STATE", "value": {"bookmarks": {STREAM: bookmark}}})
    return [json.dumps(line, separators=(",", ":")) for line in lines]


def parse_now(text: str) -> datetime:
    """Parse an ISO-8601 time (``Z`` allowed); a time without offset is taken as UTC."""
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).replace(microsecond=0)


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--now", help="ISO-8601 time the extract is taken at (default: now, UTC)")
    parser.add_argument("--out", type=Path, help="output file (default: stdout)")
    args = parser.parse_args(argv)
    now = parse_now(args.now) if args.now else datetime.now(timezone.utc).replace(microsecond=0)
    text = "\n".join(singer_lines(now)) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
