"""Requests per loose image on the local S3 server: one listing, then one GET per image and per sidecar
that exists (sidecars are found in the listing, not probed for)."""

import pytest

from omnilmm_ray.config import InputConfig
from omnilmm_ray.readers import read_shard
from omnilmm_ray.samples import draw, encode
from omnilmm_ray.sources import plan_shards
from omnilmm_ray.storage import resolve
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration


def test_loose_images_cost_one_get_each_plus_their_sidecars(s3, s3_endpoint):
    s3.mkdir("loose-req")
    for i in range(12):
        s3.pipe(f"loose-req/pics/a{i // 6}/img{i:02d}.jpg", encode(draw(i, size=(64, 48))[0]))
    s3.pipe("loose-req/pics/a0/img00.txt", b"a caption")
    s3.pipe("loose-req/pics/a1/img07.json", b'{"url": "u7"}')
    s3.pipe("loose-req/pics/a1/empty.png", b"")
    with FaultyProxy(s3_endpoint) as proxy:
        cfg = InputConfig(files_per_shard=5, storage_options={"endpoint_url": proxy.url})
        shards = plan_shards(["s3://loose-req/pics"], cfg)
        listed = proxy.count
        # Shards are read by other processes (Ray workers), where no listing is cached.
        resolve("s3://loose-req", cfg.storage_options)[0].invalidate_cache()
        rows = [r for s in shards for t in read_shard(s, cfg) for r in t.to_pylist() if r["key"]]
        reads = proxy.count - listed
    assert listed <= 3  # the folder is listed once (plus a probe of what the input names)
    # 12 images and 2 sidecars one GET each; the empty file: a refused range, then the plain read
    assert len(rows) == 13 and reads <= 12 + 2 + 3
    by_key = {r["key"]: r for r in rows}
    assert (
        by_key["a0/img00.jpg"]["text"] == "a caption"
        and by_key["a1/img07.jpg"]["metadata"] == '{"url": "u7"}'
    )
    assert by_key["a0/img01.jpg"]["text"] is None and by_key["a1/empty.png"]["image"] == b""
