"""The prefetch count follows the small messages in hand (kombu's own QoS object)."""

from __future__ import annotations

from kombu.common import QoS

from workers.prefetch import SmallMessages


def _qos(initial: int) -> tuple[QoS, list[int]]:
    """A consumer's QoS as Celery makes it, recording each prefetch count it applies."""
    applied: list[int] = []
    qos = QoS(lambda prefetch_count: applied.append(prefetch_count), initial)
    return qos, applied


def test_each_small_message_in_hand_lets_one_more_in_up_to_the_most() -> None:
    policy = SmallMessages(base=2, most=6, small_below=16)
    qos, applied = _qos(6)  # Celery starts at the pool's size
    policy.attach(qos)
    assert applied == [2], "the base applies before the first message is read"
    for i in range(3):
        policy.received(f"small-{i}", instances=1)
    assert qos.value == 5
    policy.received("big", instances=64)  # a chunk of a big job fills batches alone
    policy.received("edge", instances=16)  # a batch's worth is not small
    assert qos.value == 5
    for i in range(3, 8):
        policy.received(f"small-{i}", instances=15)
    assert qos.value == 6 and policy.in_hand == 8, "never beyond the most"
    for i in range(8):
        policy.finished(f"small-{i}")
    policy.finished("big")
    policy.finished("edge")
    assert qos.value == 2 and policy.in_hand == 0, "back to the base once the small ones are done"
    qos.update()
    assert applied[-1] == 2


def test_a_retried_message_counts_each_time_it_is_in_hand() -> None:
    # A retry (database unreachable) comes back with its task id: received twice, finished
    # twice, whatever the order.
    policy = SmallMessages(base=1, most=8, small_below=16)
    qos, _ = _qos(8)
    policy.attach(qos)
    policy.received("a", instances=1)
    policy.received("a", instances=1)
    assert qos.value == 3
    policy.finished("a")
    policy.finished("a")
    policy.finished("a")  # revoked after it ran: nothing more to take back
    assert qos.value == 1 and policy.in_hand == 0


def test_a_new_consumer_starts_from_the_small_messages_still_in_hand() -> None:
    # After a lost connection Celery makes a new QoS at the pool's size; messages still
    # running keep their place.
    policy = SmallMessages(base=2, most=16, small_below=16)
    first, _ = _qos(16)
    policy.attach(first)
    for i in range(4):
        policy.received(str(i), instances=1)
    second, applied = _qos(16)
    policy.attach(second)
    assert applied == [6]
    policy.finished("0")
    assert second.value == 5
