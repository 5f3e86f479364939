"""engines.fake.Decoder: the fake engine's model of lmdeploy's pipeline over a continuous-batching engine (steps
counted, not timed): a shared set of slots, first come first served, a freed slot refilled at once from the
waiting captions, a call done with its longest caption."""

import threading

from omnilmm_ray.config import EngineConfig
from omnilmm_ray.engines.fake import Decoder, FakeEngine
from omnilmm_ray.samples import draw


def test_captions_beyond_the_slots_wait_for_one_to_free():
    limited, unlimited = Decoder(slots=2, step_s=0), Decoder(slots=None, step_s=0)
    limited.decode([3, 3, 3])
    unlimited.decode([3, 3, 3])
    assert (limited.steps, limited.busy) == (6, 9)  # two for 3 steps, then the third alone
    assert (unlimited.steps, unlimited.busy) == (3, 9)


def test_a_freed_slot_takes_the_next_waiting_caption_at_once():
    d = Decoder(slots=2, step_s=0)
    d.decode([1, 4, 1])  # step 1: [1, 4]; the third enters as the first ends: steps 2-4
    assert (d.steps, d.busy) == (4, 6)


def test_a_call_holding_every_slot_keeps_another_calls_captions_out_until_it_is_done():
    d = Decoder(slots=2, step_s=0.002)
    first = threading.Thread(target=d.decode, args=([50, 50],))
    first.start()
    while d.steps == 0:  # the first call holds both slots
        pass
    second = threading.Thread(target=d.decode, args=([1],))
    second.start()
    first.join(10)
    second.join(10)
    assert (d.steps, d.busy) == (51, 101)  # not 50: the second call's caption waited for a slot


def test_the_fake_engine_decodes_each_caption_for_a_length_drawn_from_its_image():
    cfg = EngineConfig(backend="fake", max_batch_size=4, fake_decode_step_s=0.001, fake_caption_tokens=(3, 9))
    engine = FakeEngine(cfg)
    images = [draw(i, mark=True)[0] for i in range(12)]
    first = engine.caption("Describe.", images)
    lengths = [c.output_tokens for c in first]
    assert all(3 <= n <= 9 for n in lengths) and len(set(lengths)) > 1
    assert engine.decoder.busy == sum(lengths)  # every token of every caption took a slot for a step
    assert [c.output_tokens for c in FakeEngine(cfg).caption("Describe.", images)] == lengths
