"""Sharded streaming: writing any reader to tar/jsonl shards and reading them back split by rank and worker."""
from __future__ import annotations

import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from glip_data.readers import COCODetection, MDETRGrounding, MixtureDataset
from glip_data.shards import MixedStream, ShardedStream, write_shards
from glip_data.synth import SynthConfig, generate_world

TINY = SynthConfig(num_detection=6, num_grounding=5, num_captions=0, num_val=0, min_size=64, max_size=96)


def keep_list(batch):
    return batch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("shard_world"), seed=1, config=TINY)


@pytest.fixture(scope="module")
def grounding(world):
    return MDETRGrounding(world.grounding_train, world.image_root)  # 10 samples (2 sentences per image)


def same_sample(a, b):
    assert a.caption == b.caption and a.width == b.width and a.height == b.height
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert [list(map(tuple, t)) for t in a.tokens_positive] == [list(map(tuple, t)) for t in b.tokens_positive]
    assert {k: v for k, v in a.metadata.items() if k != "shard_key"} == \
        {k: v for k, v in b.metadata.items() if k != "shard_key"}


@pytest.mark.parametrize("kind, compress", [("tar", False), ("tar", True), ("jsonl", True), ("jsonl", False)])
def test_round_trip_through_shards(grounding, tmp_path, kind, compress):
    index = write_shards(grounding, tmp_path / "s", kind=kind, samples_per_shard=4, compress=compress,
                         progress=False)
    assert [s["count"] for s in index["shards"]] == [4, 4, 2] and index["num_samples"] == 10
    streamed = list(ShardedStream(tmp_path / "s"))
    assert len(streamed) == len(grounding)
    for i, sample in enumerate(streamed):
        direct = grounding.load_image(grounding[i])
        same_sample(sample, direct)
        assert np.array_equal(np.asarray(sample.image), np.asarray(direct.image))  # bytes copied, not re-encoded
        assert sample.metadata["shard_key"] == f"{i:09d}"


def test_tar_layout_and_reproducibility(grounding, tmp_path):
    write_shards(grounding, tmp_path / "a", samples_per_shard=6, progress=False)
    write_shards(grounding, tmp_path / "b", samples_per_shard=6, progress=False)
    first = (tmp_path / "a" / "shard-000000.tar").read_bytes()
    assert first == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.json", "000000000.jpg", "000000001.json", "000000001.jpg"]
    record = json.loads(tarfile.open(tmp_path / "a" / "shard-000000.tar").extractfile("000000000.json").read())
    assert record["image"] == "000000000.jpg" and record["caption"] == grounding[0].caption


def keys_by_reader(source, world_size, num_workers, **kwargs):
    got = {}
    for rank in range(world_size):
        stream = ShardedStream(source, load_image=False, rank=rank, world_size=world_size, **kwargs)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=keep_list)
        got[rank] = [s.metadata["shard_key"] for s in loader]
    return got


def test_split_by_rank_and_worker_reads_disjoint_shards(grounding, tmp_path):
    write_shards(grounding, tmp_path / "s", kind="jsonl", samples_per_shard=1, progress=False)  # 10 shards
    got = keys_by_reader(tmp_path / "s", world_size=2, num_workers=2)
    everything = got[0] + got[1]
    assert sorted(everything) == [f"{i:09d}" for i in range(10)]  # each sample exactly once
    # reader (rank, worker) reads shards rank * workers + worker, + 4, + 8 ...: rank 0 gets 0,1,4,5,8,9
    assert sorted(got[0]) == [f"{i:09d}" for i in (0, 1, 4, 5, 8, 9)]
    stream = ShardedStream(tmp_path / "s", load_image=False)
    assert stream.assignment(3, 4)[0] == [3, 7] and stream.assignment(3, 4)[1] is False


def test_fewer_shards_than_readers_and_equal_split(grounding, tmp_path):
    write_shards(grounding, tmp_path / "s", samples_per_shard=4, progress=False)  # 3 shards: 4, 4, 2
    with pytest.warns(UserWarning, match="every reader scans every shard"):
        list(ShardedStream(tmp_path / "s", load_image=False, rank=0, world_size=4))
    got = keys_by_reader(tmp_path / "s", world_size=2, num_workers=2)
    assert sorted(got[0] + got[1]) == [f"{i:09d}" for i in range(10)]
    assert sorted(got[1]) == [f"{i:09d}" for i in (2, 3, 6, 7)]  # strided: readers 2 and 3 of 4
    equal = keys_by_reader(tmp_path / "s", world_size=2, num_workers=2, equal_split=True)
    assert len(equal[0]) == len(equal[1]) == 4  # 10 // 4 readers = 2 each
    write_shards(grounding, tmp_path / "t", samples_per_shard=3, progress=False)  # 4 shards: 3, 3, 3, 1
    equal = keys_by_reader(tmp_path / "t", world_size=2, num_workers=1, equal_split=True)
    assert len(equal[0]) == len(equal[1]) == 4  # shards {0, 2} = 6 and {1, 3} = 4 -> both capped at 4


def test_shuffle_is_seeded_per_epoch(grounding, tmp_path):
    write_shards(grounding, tmp_path / "s", kind="jsonl", samples_per_shard=2, progress=False)
    stream = ShardedStream(tmp_path / "s", load_image=False, shuffle=True, shuffle_buffer=4, seed=3)
    epoch0 = [s.metadata["shard_key"] for s in stream]
    assert epoch0 == [s.metadata["shard_key"] for s in stream]
    stream.set_epoch(1)
    epoch1 = [s.metadata["shard_key"] for s in stream]
    assert sorted(epoch0) == sorted(epoch1) == [f"{i:09d}" for i in range(10)] and epoch0 != epoch1


def test_mixture_to_shards_and_mixed_stream(world, grounding, tmp_path):
    det = COCODetection(world.detection_train, world.image_root)
    mix = MixtureDataset({"det": det, "ground": grounding}, weights=[1, 1], num_samples=8, seed=0)
    write_shards(mix, tmp_path / "mix", kind="jsonl", samples_per_shard=4, progress=False)
    sources = Counter(s.metadata["mixture_source"] for s in ShardedStream(tmp_path / "mix", load_image=False))
    assert sum(sources.values()) == 8 and set(sources) == {"det", "ground"}

    write_shards(det, tmp_path / "d", kind="jsonl", samples_per_shard=2, progress=False)
    write_shards(grounding, tmp_path / "g", kind="jsonl", samples_per_shard=2, progress=False)
    streams = [ShardedStream(tmp_path / "d", load_image=False), ShardedStream(tmp_path / "g", load_image=False)]
    drawn = [s.metadata["task"] for s in MixedStream(streams, [3, 1], seed=0, num_samples=400)]
    assert len(drawn) == 400
    sigma = (400 * 0.25 * 0.75) ** 0.5
    assert abs(drawn.count("grounding") - 100) < 4 * sigma
    first = list(MixedStream(streams, [1, 1], seed=0))  # ends when one stream runs out
    assert Counter(s.metadata["task"] for s in first)["detection"] <= len(det)


def test_bad_record_names_shard_and_key(grounding, tmp_path):
    write_shards(grounding, tmp_path / "s", kind="jsonl", samples_per_shard=20, progress=False)
    path = tmp_path / "s" / "shard-000000.jsonl"
    lines = path.read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["boxes"]
    lines[1] = json.dumps(broken)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"shard-000000\.jsonl:2: record misses \['boxes'\]"):
        list(ShardedStream(tmp_path / "s", load_image=False))
