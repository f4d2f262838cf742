"""Kafka topic names and their creation. The only module that administers topics."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from .errors import StreamaggError
from .events import EVENT_KINDS, EventKind
from .settings import Settings

log = logging.getLogger(__name__)


class TopicError(StreamaggError):
    retriable = True


def source_topics(settings: Settings) -> dict[str, EventKind]:
    """Topic name -> event kind, for the four source topics."""
    return {settings.topic(kind): kind for kind in EVENT_KINDS}


def deadletter_topic(settings: Settings) -> str:
    return settings.topic("deadletter")


def _admin(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id=f"{settings.app_id}-admin")
    except KafkaError as exc:
        raise TopicError(f"kafka at {settings.kafka_bootstrap} is unreachable: {exc}") from exc


def existing_partitions(settings: Settings, names: list[str]) -> dict[str, int]:
    """Partition counts of those of ``names`` that exist on the broker; creates nothing."""
    admin = _admin(settings)
    try:
        present = [name for name in names if name in set(admin.list_topics())]
        return {topic["name"]: len(topic["partitions"]) for topic in admin.describe_topics(present)} if present else {}
    except KafkaError as exc:
        raise TopicError(f"cannot describe topics on {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        admin.close()


def ensure_topics(settings: Settings, names: list[str] | None = None, changelog: str | None = None) -> dict[str, int]:
    """Create the source and dead letter topics (``STREAMAGG_PARTITIONS`` partitions) if missing.

    Returns each topic's partition count as it is on the broker (an existing topic keeps its own).
    An existing ``changelog`` (the worker's, whose records go to the partition of their source
    partition's number, never by key hash) with fewer partitions than a source topic grows to
    as many; a missing one is left to Faust, which makes it.
    """
    wanted = names or [*source_topics(settings), deadletter_topic(settings)]
    admin = _admin(settings)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            log.info("creating topics %s with %d partitions", ", ".join(missing), settings.partitions)
            try:
                admin.create_topics(
                    [NewTopic(name, num_partitions=settings.partitions, replication_factor=1) for name in missing]
                )
            except TopicAlreadyExistsError:
                pass  # another process created them first
        counts = {topic["name"]: len(topic["partitions"]) for topic in admin.describe_topics(wanted)}
        if changelog is not None and changelog in existing:
            needed = max(counts[topic] for topic in source_topics(settings))
            (described,) = admin.describe_topics([changelog])
            if len(described["partitions"]) < needed:
                log.info("%s has %d partitions, the source topics up to %d: adding the missing ones",
                         changelog, len(described["partitions"]), needed)  # fmt: skip
                admin.create_partitions({changelog: NewPartitions(total_count=needed)})
        return counts
    except KafkaError as exc:
        raise TopicError(f"cannot create topics on {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        admin.close()


def delete_topics(settings: Settings, prefixes: list[str]) -> list[str]:
    """Delete every topic whose name starts with one of ``prefixes`` (a benchmark's, when it is
    done: its source, dead-letter, changelog and Faust's own topics); returns their names."""
    admin = _admin(settings)
    try:
        doomed = sorted(name for name in admin.list_topics() if name.startswith(tuple(prefixes)))
        if doomed:
            admin.delete_topics(doomed)
        return doomed
    except KafkaError as exc:
        raise TopicError(f"cannot delete topics on {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        admin.close()
