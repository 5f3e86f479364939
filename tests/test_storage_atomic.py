"""A write that fails midway publishes nothing, on local disk and on the S3 API server."""

import pytest

from omnilmm_ray.storage import open_atomic, resolve


@pytest.mark.parametrize("size", [10, 12 * 2**20])  # one PUT, and a multipart upload
def test_a_failed_streaming_write_to_s3_publishes_nothing(s3, size):
    s3.mkdir(f"atomic{size}")
    fs, path = resolve(f"s3://atomic{size}/latest.parquet")
    with pytest.raises(RuntimeError, match="midway"):
        with open_atomic(fs, path) as f:
            f.write(b"x" * size)
            raise RuntimeError("midway")
    fs.invalidate_cache()
    assert not fs.exists(path)
    with open_atomic(fs, path) as f:
        f.write(b"whole")
    assert fs.cat_file(path) == b"whole"


def test_a_failed_streaming_write_to_disk_publishes_nothing(tmp_path):
    fs, path = resolve(str(tmp_path / "latest.parquet"))
    with pytest.raises(RuntimeError), open_atomic(fs, path) as f:
        f.write(b"part")
        raise RuntimeError("midway")
    assert list(tmp_path.iterdir()) == []
