"""stages.EngineSlots: calls enter the engine by images, within batch_size x concurrent_batches, not by count;
an image-by-image retry runs alone."""

import threading
import time

from omnilmm_ray.stages import EngineSlots


def _start(slots: EngineSlots, images: int, alone: bool = False):
    """A call holding its slot until released; returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()

    def run():
        with slots.call(images, alone):
            entered.set()
            release.wait(10)

    threading.Thread(target=run, daemon=True).start()
    return entered, release


def test_full_calls_fill_the_budget_and_the_next_waits():
    slots = EngineSlots(budget=512)
    (a, ra), (b, rb) = _start(slots, 256), _start(slots, 256)
    assert a.wait(2) and b.wait(2)
    c, rc = _start(slots, 256)
    assert not c.wait(0.3)  # 768 images would exceed the budget
    ra.set()
    assert c.wait(2)
    rb.set()
    rc.set()


def test_short_calls_run_beside_full_ones_within_the_budget():
    slots = EngineSlots(budget=512)
    calls = [_start(slots, n) for n in (256, 128, 128)]  # what 384-row blocks give: 256 + 128, twice
    assert all(e.wait(2) for e, _ in calls)  # three calls, 512 images: two call slots would leave 128 out
    late, release = _start(slots, 1)
    assert not late.wait(0.3)
    for _, r in calls + [(late, release)]:
        r.set()


def test_a_call_larger_than_the_budget_still_enters_an_empty_engine():
    slots = EngineSlots(budget=100)
    e, r = _start(slots, 256)
    assert e.wait(2)
    r.set()


def test_an_alone_call_waits_for_an_empty_engine_and_keeps_others_out():
    slots = EngineSlots(budget=512)
    first, r1 = _start(slots, 10)
    assert first.wait(2)
    alone, ra = _start(slots, 1, alone=True)
    assert not alone.wait(0.3)  # the engine is not empty
    r1.set()
    assert alone.wait(2)
    other, ro = _start(slots, 1)
    assert not other.wait(0.3)  # nothing beside an alone call
    ra.set()
    assert other.wait(2)
    ro.set()
    time.sleep(0.05)
    with slots.call(512):  # everything has left: the whole budget is free again
        pass
