"""A smoke check of the configured Kafka and PostgreSQL: one record round trip, one query."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

from .errors import StackError
from .settings import Settings


def smoke_check(settings: Settings) -> Iterator[str]:
    yield _kafka_round_trip(settings.kafka_bootstrap)
    yield asyncio.run(_postgres_query(settings))


def _kafka_round_trip(bootstrap: str) -> str:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError

    topic = f"streamagg.smoke.{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="streamagg-smoke")
        try:
            admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
            producer = KafkaProducer(bootstrap_servers=bootstrap)
            producer.send(topic, b"ping").get(timeout=30)
            producer.close()
            consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            values: list[bytes] = []
            deadline = time.monotonic() + 30
            while not values and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    values.extend(record.value for record in records)
            consumer.close()
        finally:
            admin.delete_topics([topic])
            admin.close()
    except KafkaError as exc:
        raise StackError(f"kafka at {bootstrap} failed the smoke check: {exc}") from exc
    if values[:1] != [b"ping"]:
        raise StackError(f"kafka at {bootstrap}: produced b'ping', read back {values[:1]!r}")
    return f"kafka {bootstrap}: record round trip ok in {time.monotonic() - started:.2f} s"


async def _postgres_query(settings: Settings) -> str:
    import asyncpg

    try:
        conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        raise StackError(f"postgresql at {settings.redacted_dsn()} is unreachable: {type(exc).__name__}") from None
    try:
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return f"postgresql {settings.redacted_dsn()}: server {version} answers"
