"""CloudEvents attributes of the worker's TRANSITIONS and STATE messages, as Kafka headers (binary content mode).

The value stays the JSON the schemas describe; the headers say what it is without parsing it: which event
(``ce_id``), of which kind and schema (``ce_type``, ``ce_dataschema``, ``ce_schemaversion``), from which deployment
(``ce_source``), and when it happened (``ce_time``). docs/consuming.md, "Headers", is the consumer's side.

Identity. ``ce_id`` starts with ``<userid>:<epoch>:<seq>``, the numbering consumers already deduplicate by:

* TRANSITIONS: exactly that. A transition re-sent after a restart (S10) carries the same id and ``ce_time``
  (its ``at``), so source + id name one event however often it is sent, as CloudEvents requires of duplicates.
* STATE: that plus ``:`` and a digest of the value. STATE's ``seq`` is the number of the last transition the value
  includes, and the value also changes without a transition (another session, ``last_seen``, ``verified_at``), so
  several distinct STATE values share an ``<epoch>:<seq>``. The digest keeps the id unique per distinct value
  while a re-send of the same record (same bytes) keeps its id.
* A STATE tombstone (a deleted user, S6): ``<userid>:<epoch>:<seq>:deleted``, the epoch and ``seq`` of the deleted
  record, so the same as the deletion transition it follows; no ``content-type`` nor ``ce_dataschema``, since it
  has no data.

Pure and cheap: the glue builds one list per message. Header values are bytes, as Kafka clients want them.
"""

from __future__ import annotations

import functools
import hashlib
from datetime import UTC, datetime
from typing import Final

from streams.rules import Transition, UserRecord

#: ``(name, value)`` pairs in the order they are sent. A list: aiokafka's record builder takes nothing else.
Headers = list[tuple[str, bytes]]

SPEC_VERSION: Final = "1.0"
CONTENT_TYPE: Final = "application/json"
#: Event types: the topic's role (singular: one message is one transition, one user's state) and the schema's major
#: version, as in the schema files' names. A new major version is a new type, like a new topic.
TRANSITION_TYPE: Final = "im.presence.transition.v1"
STATE_TYPE: Final = "im.presence.state.v1"
#: The schemas' ``$id`` (schemas/*.v1.schema.json; a unit test checks they agree). CloudEvents asks a new URI for an
#: incompatible change only, which is what the major version in the ``$id`` is.
TRANSITIONS_SCHEMA: Final = "https://github.com/rongcloud-presence/schemas/transitions.v1.schema.json"
STATE_SCHEMA: Final = "https://github.com/rongcloud-presence/schemas/state.v1.schema.json"
#: The release (``x-schema-version``) of both schemas this worker writes: a CloudEvents extension attribute, so a
#: consumer can tell which minor release a message follows (schemas/CHANGELOG.md). Both files share the number.
SCHEMA_RELEASE: Final = "1.5"
#: What a STATE tombstone's ``ce_id`` ends with.
DELETED: Final = "deleted"

_SPEC = SPEC_VERSION.encode()
_JSON = CONTENT_TYPE.encode()
_TRANSITION = TRANSITION_TYPE.encode()
_STATE = STATE_TYPE.encode()
_TRANSITIONS_SCHEMA = TRANSITIONS_SCHEMA.encode()
_STATE_SCHEMA = STATE_SCHEMA.encode()
_RELEASE = SCHEMA_RELEASE.encode()


def event_id(userid: str, epoch: int, seq: int) -> str:
    """``<userid>:<epoch>:<seq>``. A userid may itself hold ``:``: split from the right."""
    return f"{userid}:{epoch}:{seq}"


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 in UTC with milliseconds, e.g. ``2025-01-01T00:00:00.123Z``."""
    second, milli = divmod(ms, 1000)
    return f"{_second_prefix(second)}{milli:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second_prefix(second: int) -> str:
    # Formatting a date costs several microseconds; a worker's messages of one batch fall in few seconds.
    return datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def _common(source: str, id_: str, type_: bytes, time_ms: int) -> Headers:
    return [
        ("ce_specversion", _SPEC),
        ("ce_id", id_.encode()),
        ("ce_source", source.encode()),
        ("ce_type", type_),
        ("ce_time", rfc3339(time_ms).encode()),
    ]


def transition_headers(source: str, transition: Transition) -> Headers:
    """A TRANSITIONS message's headers. ``ce_time`` is the transition's ``at`` (when the status changed), not the
    send time ``emitted_at``: a re-send is then the same event in every attribute."""
    headers = _common(
        source, event_id(transition.userid, transition.epoch, transition.seq), _TRANSITION, transition.at
    )
    headers += [
        ("ce_dataschema", _TRANSITIONS_SCHEMA),
        ("ce_schemaversion", _RELEASE),
        ("content-type", _JSON),
    ]
    return headers


def state_time(record: UserRecord) -> int:
    """The newest time a STATE value holds: ``last_seen`` or, when later, ``verified_at``."""
    verified = record.verified_at
    return record.last_seen if verified is None or verified < record.last_seen else verified


def state_headers(source: str, record: UserRecord, value: bytes) -> Headers:
    """A STATE value's headers; ``value`` is the encoded STATE the message carries."""
    digest = hashlib.blake2b(value, digest_size=8).hexdigest()
    id_ = f"{event_id(record.userid, record.epoch, record.seq)}:{digest}"
    headers = _common(source, id_, _STATE, state_time(record))
    headers += [("ce_dataschema", _STATE_SCHEMA), ("ce_schemaversion", _RELEASE), ("content-type", _JSON)]
    return headers


def tombstone_headers(source: str, record: UserRecord, deleted_at: int) -> Headers:
    """A STATE tombstone's headers: ``record`` is the deleted user's final record, ``deleted_at`` the deletion
    transition's ``at``. No data, so no content type nor schema."""
    id_ = f"{event_id(record.userid, record.epoch, record.seq)}:{DELETED}"
    return _common(source, id_, _STATE, deleted_at)
