"""CloudEvents headers of TRANSITIONS and STATE (streams/envelope.py; docs/consuming.md, "Headers")."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pytest

from streams import envelope
from streams.processor import Outgoing, Processor
from streams.rules import Cause, PresenceConfig, SessionState, Transition, UserRecord
from tests.schemas import load

# Past 2^31 seconds (2038) and far past 2^31 milliseconds: epochs and times are int64 (schemas/CHANGELOG.md).
BIG = 4_102_444_800_123  # 2100-01-01T00:00:00.123Z
T = 1_700_000_000_000


def transition(userid: str = "u:1", epoch: int = BIG, seq: int = 3, at: int = T) -> Transition:
    return Transition(
        userid, "offline", "online", at, Cause("s", "online", "iOS", None), ("mobile",), 1, epoch, seq
    )


def record(**changes: Any) -> UserRecord:
    base = UserRecord(
        "u:1", {"s": SessionState("online", T, "iOS", None, T)}, BIG, 0, T, None, False, "online", None, ()
    )
    return base._replace(**changes)


def test_the_constants_name_the_schema_files_ids_and_release() -> None:
    """A schema release or a moved $id without the worker following fails here."""
    transitions, state = load("transitions.v1.schema.json"), load("state.v1.schema.json")
    assert envelope.TRANSITIONS_SCHEMA == transitions["$id"]
    assert envelope.STATE_SCHEMA == state["$id"]
    assert envelope.SCHEMA_RELEASE == transitions["x-schema-version"] == state["x-schema-version"]
    # The type carries the major version of the $id it describes.
    assert envelope.TRANSITION_TYPE.endswith(".v1") and transitions["$id"].endswith(
        "transitions.v1.schema.json"
    )
    assert envelope.STATE_TYPE.endswith(".v1") and state["$id"].endswith("state.v1.schema.json")


def test_a_transition_carries_every_attribute() -> None:
    headers = envelope.transition_headers("presence-worker", transition())
    assert [name for name, _ in headers] == [
        "ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_dataschema", "ce_schemaversion",
        "content-type",
    ]  # fmt: skip
    assert all(isinstance(value, bytes) for _, value in headers)
    assert dict(headers) == {
        "ce_specversion": b"1.0",
        "ce_id": f"u:1:{BIG}:3".encode(),
        "ce_source": b"presence-worker",
        "ce_type": b"im.presence.transition.v1",
        "ce_time": b"2023-11-14T22:13:20.000Z",
        "ce_dataschema": b"https://github.com/rongcloud-presence/schemas/transitions.v1.schema.json",
        "ce_schemaversion": envelope.SCHEMA_RELEASE.encode(),
        "content-type": b"application/json",
    }


def test_the_id_splits_from_the_right_even_when_the_userid_holds_colons() -> None:
    ce_id = dict(envelope.transition_headers("w", transition(userid="a:b:c", epoch=BIG, seq=7)))[
        "ce_id"
    ].decode()
    userid, epoch, seq = ce_id.rsplit(":", 2)
    assert (userid, int(epoch), int(seq)) == ("a:b:c", BIG, 7)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (T + 999, "2023-11-14T22:13:20.999Z"),
        (BIG, "2100-01-01T00:00:00.123Z"),
    ],
)
def test_times_are_rfc3339_utc_with_milliseconds(ms: int, text: str) -> None:
    assert envelope.rfc3339(ms) == text
    assert round(datetime.fromisoformat(text).timestamp() * 1000) == ms


def test_a_resent_transition_is_the_same_event() -> None:
    """A re-send (S10) keeps its id and time; the send time (emitted_at) is in the value, not the headers."""
    assert envelope.transition_headers("w", transition()) == envelope.transition_headers("w", transition())


def test_state_ids_start_with_the_numbering_and_differ_for_different_values() -> None:
    rec = record(seq=0)
    one = dict(envelope.state_headers("w", rec, b'{"a":1}'))
    two = dict(envelope.state_headers("w", rec, b'{"a":2}'))
    again = dict(envelope.state_headers("w", rec, b'{"a":1}'))
    assert one["ce_id"].startswith(f"u:1:{BIG}:0:".encode())
    assert one["ce_id"] != two["ce_id"]  # same (epoch, seq), another value: another event
    assert one == again  # the same value sent again: a duplicate
    assert one["ce_type"] == b"im.presence.state.v1"
    assert one["ce_dataschema"] == b"https://github.com/rongcloud-presence/schemas/state.v1.schema.json"
    assert one["content-type"] == b"application/json"
    assert one["ce_time"] == envelope.rfc3339(T).encode()


def test_state_time_is_the_newest_time_the_value_holds() -> None:
    assert envelope.state_time(record(last_seen=T, verified_at=None)) == T
    assert envelope.state_time(record(last_seen=T, verified_at=T - 5)) == T
    assert envelope.state_time(record(last_seen=T, verified_at=T + 5)) == T + 5


def test_a_tombstone_names_the_deleted_record_and_has_no_data_attributes() -> None:
    headers = dict(envelope.tombstone_headers("w", record(seq=4), T + 9))
    assert headers["ce_id"] == f"u:1:{BIG}:4:deleted".encode()
    assert headers["ce_type"] == b"im.presence.state.v1"
    assert headers["ce_time"] == envelope.rfc3339(T + 9).encode()
    assert "content-type" not in headers and "ce_dataschema" not in headers


def _raw(userid: str, status: int, at: int) -> bytes:
    return orjson.dumps({"schema": 1, "userid": userid, "status": status, "time": at, "sessionId": "s", "os": "iOS",
                         "clientIp": None, "received_at": at, "delivery_id": "d"})  # fmt: skip


def test_the_processor_puts_headers_consistent_with_each_value_on_every_message() -> None:
    """Transitions, STATE and the deletion's tombstone (S6) of one user's life, through the processor."""
    table: dict[str, bytes] = {}
    config = PresenceConfig(user_retention_ms=60_000)
    processor = Processor(table, config, lambda p: list(table.items()), source="deployment-a")
    out: list[Outgoing] = []
    out += processor.on_raw(0, 0, b"u", _raw("u", 0, T), T)
    out += processor.on_raw(0, 1, b"u", _raw("u", 1, T + 1000), T + 1000)
    # Another user's event moves stream time past u's retention: u is deleted.
    out += processor.on_raw(0, 2, b"v", _raw("v", 0, T + 10 * 60_000), T + 10 * 60_000)
    u = [o for o in out if o.key == b"u"]
    assert [o.topic for o in u] == ["transitions", "state", "transitions", "state", "transitions", "state"]
    assert u[-1].value is None  # the tombstone
    for message in u:
        headers = dict(message.headers or ())
        assert headers["ce_source"] == b"deployment-a"
        if message.value is None:
            deletion = orjson.loads(u[-2].value or b"")
            assert deletion["cause"]["event"] == "deleted"
            assert headers["ce_id"] == f"u:{deletion['epoch']}:{deletion['seq']}:deleted".encode()
            assert headers["ce_time"] == envelope.rfc3339(deletion["at"]).encode()
            continue
        value = orjson.loads(message.value)
        if message.topic == "transitions":
            assert headers["ce_id"] == f"u:{value['epoch']}:{value['seq']}".encode()
            assert headers["ce_time"] == envelope.rfc3339(value["at"]).encode()
        else:
            assert headers["ce_id"].startswith(f"u:{value['epoch']}:{value['seq']}:".encode())
            assert headers["ce_time"] == envelope.rfc3339(value["last_seen"]).encode()


def test_the_kafka_client_takes_the_headers_as_built() -> None:
    """aiokafka's C record builder takes headers as a list only (a tuple fails at send time, in the worker)."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    for headers in (
        envelope.transition_headers("w", transition()),
        envelope.state_headers("w", record(), b"{}"),
        envelope.tombstone_headers("w", record(), T),
    ):
        assert DefaultRecordBatchBuilder.estimate_size_in_bytes(b"u", b"{}", headers) > 0
        assert builder.append(0, timestamp=T, key=b"u", value=b"{}", headers=headers) is not None
