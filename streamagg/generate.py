"""`streamagg generate`: produce synthetic telemetry (streamagg.synth) to the source topics.

Each record's Kafka timestamp is its event time, so a backfill can find offsets by time.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from .buckets import HOUR_MS
from .settings import Settings
from .synth import Synth
from .topics import TopicError, ensure_topics

log = logging.getLogger(__name__)

_IN_FLIGHT = 5000


@dataclass(frozen=True)
class Generated:
    counts: dict[str, int]  # per topic
    start_ms: int
    end_ms: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def generate(
    settings: Settings,
    hours: int,
    per_hour: int,
    seed: int,
    start_ms: int,
    progress: Callable[[int, int], None] | None = None,
) -> Generated:
    """Produce ``hours`` hours of ``per_hour`` events from ``start_ms`` (an hour boundary)."""
    ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=f"{settings.app_id}-generate",
        linger_ms=10,
        max_batch_size=512 * 1024,
        acks="all",
        enable_idempotence=True,
    )
    counts: Counter[str] = Counter()
    total = hours * per_hour
    try:
        await producer.start()
    except KafkaError as exc:
        raise TopicError(f"kafka at {settings.kafka_bootstrap} is unreachable: {exc}") from exc
    try:
        pending = []
        for kind, time_ms, event in Synth(seed).events(start_ms, hours, per_hour):
            topic = settings.topic(kind)
            key = str(next(iter(event.values()))).encode()  # the event's id: spreads partitions
            value = json.dumps(event, separators=(",", ":")).encode()
            pending.append(await producer.send(topic, value, key=key, timestamp_ms=time_ms))
            counts[topic] += 1
            if len(pending) >= _IN_FLIGHT:
                for future in pending:
                    await future
                pending.clear()
                if progress:
                    progress(sum(counts.values()), total)
        for future in pending:
            await future
        await producer.flush()
    except KafkaError as exc:
        raise TopicError(f"producing to {settings.kafka_bootstrap} failed: {exc}") from exc
    finally:
        await producer.stop()
    if progress:
        progress(total, total)
    return Generated(dict(counts), start_ms, start_ms + hours * HOUR_MS)

