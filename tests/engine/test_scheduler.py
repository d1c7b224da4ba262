"""Scheduler: FIFO admission by free slots, a bounded waiting queue, and giving up on requests that waited too long."""

from lowbit.engine.scheduler import Scheduler


def slots(n):
    free = list(range(n))
    return lambda rid: bool(free) and free.pop() is not None


def test_admits_while_slots_last_then_decodes():
    s = Scheduler()
    for rid, n in (("a", 5), ("b", 3), ("c", 7)):
        assert s.add(rid, n)
    alloc = slots(2)
    assert s.schedule(alloc) == {"a": 5, "b": 3}
    assert s.schedule(alloc) == {"a": 1, "b": 1}
    s.finish("a")
    assert s.schedule(lambda rid: True) == {"b": 1, "c": 7}
    assert s.num_unfinished == 2 and s.num_waiting == 0


def test_waiting_queue_is_bounded():
    s = Scheduler(max_waiting=2)
    assert s.add("a", 1) and s.add("b", 1)
    assert not s.add("c", 1)
    s.schedule(slots(1))  # "a" leaves the queue
    assert s.add("c", 1)


def test_expire_drops_only_requests_that_waited_too_long():
    s = Scheduler(max_wait_s=1.0)
    s.add("old", 1, now=0.0)
    s.add("new", 1, now=0.8)
    assert s.expire(now=1.5) == ["old"]
    assert list(s.waiting) == ["new"] and s.num_unfinished == 1
    s.schedule(slots(1))
    assert s.expire(now=100.0) == []  # running requests never expire
    assert Scheduler().expire(now=1e9) == []
