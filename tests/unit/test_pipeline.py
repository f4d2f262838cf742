"""The pipeline over a restored partition: a replay up to the meta record is not handled twice."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from streamagg.pipeline import Pipeline, RawMessage
from streamagg.settings import Settings
from streamagg.state import decode_key
from streamagg.telemetry import Telemetry
from tests.unit.test_aggregate import START_MS


def test_a_replay_up_to_the_meta_record_dead_letters_nothing_again() -> None:
    """The worker before dead-lettered message 1 and checkpointed up to message 3 without a
    commit (a stop's checkpoint): the replay from message 0 sends no dead letter again and
    counts nothing twice; a bad message after the meta record is dead-lettered as ever."""
    settings = Settings()
    topic = settings.topic("traces")
    good = [json.dumps({"trace_id": f"t{i}", "operation_type": "chat", "started_at": START_MS + i, "duration_ms": 5,
                        "status": "success"}).encode() for i in range(6)]  # fmt: skip
    values = [good[0], b"{not json", good[2], good[3], b"[]", good[5]]
    messages = [RawMessage(topic, 0, offset, value) for offset, value in enumerate(values)]
    first = Pipeline(settings, Telemetry(CollectorRegistry()), lambda t, p: [], clock=lambda: START_MS)
    assert [letter.message.offset for letter in first.process(messages[:4]).dead] == [1]
    before = first.states[(topic, 0)]
    log = {key: value for key, value in before.checkpoint_records().in_order()}
    restored = [(decode_key(key)[2], value) for key, value in log.items()]

    second = Pipeline(settings, Telemetry(CollectorRegistry()), lambda t, p: restored, clock=lambda: START_MS)
    processed = second.process(messages)  # the replay from the committed offset, 0
    assert [letter.message.offset for letter in processed.dead] == [4]
    state = second.states[(topic, 0)]
    assert state.aggregates[(START_MS // 3_600_000 * 3_600_000, "trace.count", None, None)].count == 4
