"""The tiny AWQ checkpoint's packing (omnilmm_ray/testing/tiny_awq.py), without torch: lmdeploy reads back
the weights that were quantised."""

import numpy as np

from omnilmm_ray.testing.tiny_awq import AWQ_ORDER, GROUP, dequantize, pack, quantize


def test_eight_values_pack_in_autoawqs_gemm_order():
    # AutoAWQ's GEMM packer puts column AWQ_ORDER[i] of each eight into nibble i: 0, 2, 4, 6, 1, 3, 5, 7
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    packed = pack(np.arange(8, dtype=np.uint8)[None])
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    assert packed.view(np.uint32)[0, 0] == 0x75316420


def test_lmdeploy_reads_back_the_quantised_weight():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (512, 256)).astype(np.float16)  # nn.Linear [out, in]: gate_proj of the tiny model
    t = quantize(w)
    assert t["qweight"].shape == (256, 512 // 8) and t["qweight"].dtype == np.int32
    assert t["qzeros"].shape == (256 // GROUP, 512 // 8) and t["scales"].shape == (256 // GROUP, 512)
    back = dequantize(t["qweight"], t["qzeros"], t["scales"])  # [in, out], as TurboMind holds it
    step = t["scales"].astype(np.float32).repeat(GROUP, axis=0)
    err = np.abs(back - w.astype(np.float32).T)
    assert (err <= step * 0.51 + 1e-3 * np.abs(w.T)).all(), "round to nearest: within half a step"
    assert err.mean() < 0.3 * step.mean()


def test_every_tensor_is_laid_out_in_c_order():
    # safetensors.numpy writes an array's memory as it lies: a Fortran-ordered `scales` (what min/max over the
    # transposed groups give) was saved transposed within each row, and dequantised with the wrong steps
    t = quantize(np.random.default_rng(1).normal(0, 0.05, (512, 256)).astype(np.float16))
    assert all(a.flags.c_contiguous for a in t.values()), {k: a.flags.c_contiguous for k, a in t.items()}
    assert np.array_equal(
        np.frombuffer(t["scales"].tobytes(), np.float16).reshape(t["scales"].shape), t["scales"]
    )
