"""WebDataset shards in img2dataset's layout (finding, reading, writing) and positioned streams that resume exactly."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from glip_data.readers import CaptionReader, MDETRGrounding
from glip_data.shards import CaptionFilter, ShardedStream, StreamPosition, iter_shard, write_shards
from glip_data.synth import SynthConfig, generate_world
from glip_data.webdataset import (CorruptShardError, ShardListError, expand_braces, iter_tar_samples, resolve_shards,
                                  sample_caption, sample_image, sample_metadata, write_img2dataset_shards)

TINY = SynthConfig(num_detection=2, num_grounding=5, num_captions=7, num_val=0, min_size=64, max_size=96)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("wds_world"), seed=2, config=TINY)


@pytest.fixture(scope="module")
def web(world, tmp_path_factory):
    """The world's caption-only file written as img2dataset shards of 3 samples."""
    out = tmp_path_factory.mktemp("web")
    write_img2dataset_shards(CaptionReader(world.captions_train, world.image_root, min_boxes=0), out,
                             samples_per_shard=3, progress=False)
    return out


def test_brace_expansion_keeps_zero_padding_and_alternatives():
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ShardListError, match="backwards"):
        expand_braces("{3..1}.tar")


def test_img2dataset_layout_round_trips_captions_and_phrases(world, web):
    names = sorted(p.name for p in web.iterdir() if not p.name.startswith("."))
    assert names == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar",
                     "00002_stats.json"]
    assert json.loads((web / "00002_stats.json").read_text())["count"] == 1
    with tarfile.open(web / "00000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    lines = [json.loads(x) for x in world.captions_train.read_text().splitlines()]
    samples = [s for shard in resolve_shards(web) for s in iter_tar_samples(shard)]
    assert [key for _, key, _ in samples] == [f"{i:09d}" for i in range(7)]
    for (_, _, members), line in zip(samples, lines):
        meta = sample_metadata(members)
        assert sample_caption(members, meta) == line["caption"]
        assert (meta["width"], meta["height"]) == (line["width"], line["height"])
        assert [e["tokens_positive"] for e in meta["entities"]] == [e["tokens_positive"] for e in line["entities"]]
        ext, data = sample_image(members)
        assert ext == "jpg" and data == (world.image_root / line["image"]).read_bytes()  # copied, not re-encoded


def test_the_shard_command_writes_the_same_img2dataset_shards(world, web, tmp_path):
    from glip_data.cli import main

    assert main(["shard", str(world.captions_train), str(tmp_path / "cli"), "--images", str(world.image_root),
                 "--kind", "img2dataset", "--per-shard", "3", "--quiet"]) == 0
    for name in ("00000.tar", "00001.tar", "00002.tar"):  # caption lines without boxes kept, as the fixture keeps them
        assert (tmp_path / "cli" / name).read_bytes() == (web / name).read_bytes()


def test_sources_folder_glob_braces_list_and_missing_files(web, tmp_path):
    shards = [web / f"0000{i}.tar" for i in range(3)]
    assert resolve_shards(web) == shards
    assert resolve_shards(str(web / "*.tar")) == shards
    assert resolve_shards(str(web / "{00001..00002}.tar")) == shards[1:]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# two of them\n{shards[2]}\n\n{shards[0]}\n")
    assert resolve_shards(listing) == [shards[2], shards[0]]
    listing.write_text(f"{shards[0]}\nmissing-1.tar\nmissing-2.tar\n")
    with pytest.raises(ShardListError, match=r"2 of its 3 shards do not exist: .*missing-1.tar, .*missing-2.tar"):
        resolve_shards(listing)
    with pytest.raises(ShardListError, match="no .tar"):
        resolve_shards(str(tmp_path / "*.tar"))
    with pytest.raises(ShardListError, match="no such shard"):
        resolve_shards(tmp_path / "nothing.tar")


def test_a_truncated_or_garbage_shard_is_named_with_how_far_it_got(web, tmp_path):
    data = (web / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(CorruptShardError, match=r"cut.tar: not a readable tar archive after \d samples"):
        list(iter_tar_samples(tmp_path / "cut.tar"))
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 40)
    with pytest.raises(CorruptShardError, match="junk.tar.gz"):
        list(iter_tar_samples(tmp_path / "junk.tar.gz"))
    (tmp_path / "empty.tar").write_bytes(b"")
    assert list(iter_tar_samples(tmp_path / "empty.tar")) == []
    with tarfile.open(tmp_path / "nothing.tar", "w"):
        pass
    assert list(iter_tar_samples(tmp_path / "nothing.tar")) == []


def _caption_shard(path, records):
    """A tar shard of caption records (the pseudo-label output format) without images."""
    with tarfile.open(path, "w") as tar:
        for record in records:
            data = json.dumps(record).encode()
            info = tarfile.TarInfo(f"{record['key']}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_caption_records_in_shards_are_filtered_as_the_caption_reader_filters(tmp_path):
    records = [
        {"key": "a", "image": "a.jpg", "width": 100, "height": 80, "caption": "a red circle and a star",
         "entities": [{"phrase": "a red circle", "tokens_positive": [[0, 12]], "boxes": [[1, 2, 30, 40]],
                       "scores": [0.9]},
                      {"phrase": "a star", "tokens_positive": [[17, 23]], "boxes": [[5, 5, 90, 90], [0, 0, 9, 9]],
                       "scores": [0.5, 0.7]}]},
        {"key": "b", "image": "b.jpg", "width": 50, "height": 50, "caption": "a cross",
         "entities": [{"phrase": "a cross", "tokens_positive": [[0, 7]], "boxes": [[1, 1, 9, 9]], "scores": [0.4]}]},
    ]
    _caption_shard(tmp_path / "s.tar", records)
    lines = tmp_path / "s.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    reader = CaptionReader(lines, tmp_path)
    stats = CaptionFilter()
    streamed = list(iter_shard(tmp_path / "s.tar", load_image=False, captions=stats))
    assert len(streamed) == len(reader) == 1  # "b" has no box above 0.5
    direct = reader[0]
    assert streamed[0].boxes.tolist() == direct.boxes.tolist() == [[1.0, 2.0, 29.0, 39.0], [0.0, 0.0, 8.0, 8.0]]
    assert streamed[0].tokens_positive == [[(0, 12)], [(17, 23)]]
    assert streamed[0].metadata["entities_tokens_positive"] == direct.metadata["entities_tokens_positive"]
    assert streamed[0].metadata["shard_key"] == "a" and streamed[0].metadata["task"] == "caption"
    assert stats.stats["too_few_boxes"] == 1 and stats.stats["box_below_score_threshold"] == 2
    assert len(list(iter_shard(tmp_path / "s.tar", load_image=False, captions=CaptionFilter(0.3, 1)))) == 2


@pytest.fixture(scope="module")
def sharded(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("positioned")
    write_shards(MDETRGrounding(world.grounding_train, world.image_root), out, samples_per_shard=3, progress=False)
    return out  # 10 samples in shards of 3, 3, 3, 1


@pytest.mark.parametrize("readers", [1, 2, 3, 6])
def test_a_positioned_stream_resumed_anywhere_continues_exactly(sharded, readers):
    stream = ShardedStream(sharded, shuffle=True, seed=5, load_image=False)
    for reader in range(readers):
        endless = stream.iter_from(reader, readers)
        whole = [next(endless) for _ in range(12)]  # more than a pass: the stream's epochs follow each other
        for cut in (1, 4, 7):
            again = stream.iter_from(reader, readers, whole[cut - 1][1])
            assert [(s.metadata["shard_key"], p) for s, p in (next(again) for _ in range(12 - cut))] == \
                [(s.metadata["shard_key"], p) for s, p in whole[cut:]]
    # one pass of every reader together reads every record once
    keys = []
    for reader in range(readers):
        for sample, position in stream.iter_from(reader, readers):
            if position.epoch > 0:
                break
            keys.append(sample.metadata["shard_key"])
    assert sorted(keys) == [f"{i:09d}" for i in range(10)]


def test_positions_are_plain_data_and_a_starved_reader_is_named(tmp_path):
    assert StreamPosition(*StreamPosition(2, 1, 3).as_tuple()) == StreamPosition(2, 1, 3)
    _caption_shard(tmp_path / "s.tar", [{"key": "a", "image": "a.jpg", "width": 9, "height": 9, "caption": "a dot",
                                         "entities": [{"tokens_positive": [[0, 5]], "boxes": [[1, 1, 5, 5]],
                                                       "scores": [0.9]}]}])
    stream = ShardedStream(tmp_path / "s.tar", load_image=False)
    assert next(stream.iter_from(0, 1))[1] == StreamPosition(0, 0, 1)
    with pytest.raises(ValueError, match="reader 0 of 1 finds no usable sample in a whole pass"):
        next(stream.iter_from(0, 1, captions=CaptionFilter(min_boxes=2)))
