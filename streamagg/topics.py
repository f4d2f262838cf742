"""Kafka topic names and their creation. The only module that administers topics."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import InvalidPartitionsError, KafkaError, TopicAlreadyExistsError

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
        sources = {topic: counts[topic] for topic in source_topics(settings) if topic in counts}
        if changelog is not None and sources:
            _fit_changelog(admin, changelog, changelog in existing, sources)
        return counts
    except KafkaError as exc:
        raise TopicError(f"cannot create topics on {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        admin.close()


def _fit_changelog(admin: KafkaAdminClient, changelog: str, exists: bool, sources: dict[str, int]) -> None:
    """Grow an existing changelog to the most partitions of a source topic. Faust assigns the
    partitions of topics together only when their counts are equal: with other counts, a second
    worker may get a source partition without its checkpoints, and reads it again from the log's
    start at every rebalance. A single worker does not mind; the start says so once."""
    needed = max(sources.values())
    have = len(admin.describe_topics([changelog])[0]["partitions"]) if exists else needed
    if have < needed:
        log.info("%s has %d partitions, the source topics up to %d: adding the missing ones", changelog, have, needed)
        try:
            admin.create_partitions({changelog: NewPartitions(total_count=needed)})
        except InvalidPartitionsError:  # another worker starting grew it first
            have = len(admin.describe_topics([changelog])[0]["partitions"])
        else:
            have = needed
    if len(set(sources.values())) > 1 or have != needed:
        counts = ", ".join(f"{topic} {n}" for topic, n in sources.items())
        log.warning(
            "partition counts differ (%s, the checkpoints' %s %d): one worker is fine, but with more a rebalance may "
            "give a worker partitions without their checkpoints, which it then reads again from the log's start; "
            "give the topics one count", counts, changelog, have,
        )  # fmt: skip


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
