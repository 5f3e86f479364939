"""The engine actor's timing line (stages.StageTimer): engine calls, not Ray batches, and how many were short."""

import logging

from omnilmm_ray.stages import StageTimer


def test_the_line_counts_engine_calls_and_the_short_ones(caplog):
    timer = StageTimer(batch_size=256, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="omnilmm_ray.stages"):
        for images in (256, 0, 128, 127, 255, 0):  # 0: a batch of end markers, no engine call
            timer.start("convert")
            timer.start("engine")
            timer.stop(images)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("engine actor: first batch (256 images) arrived")
    calls = [ln for ln in lines if "images/s" in ln]
    assert len(calls) == 4  # one line per engine call (every_s=0), none for the marker batches
    assert calls[-1].startswith("engine actor: 4 batches, 766 images, ")
    assert "; 1 under half of scale.batch_size; seconds per call thread: wait " in calls[-1]  # 127 < 128
