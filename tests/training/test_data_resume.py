"""Resuming a webdataset epoch from any saved position replays exactly the rest, broken shards included."""

import io
import tarfile
from collections import Counter

import pytest
from PIL import Image

from training.data import Batches, open_dataset


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    size = (8, 12) if i % 3 == 0 else (12, 8)  # two aspect ratios for bucketed batching
    Image.new("RGB", size, (i * 37 % 256, 0, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path, first: int, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            members = {"jpg": jpeg(i)[:40] if i == 1 else jpeg(i), "txt": f"c{i}".encode()}  # record 1: broken jpeg
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def broken_shards(tmp_path):
    """5 shards of 4 records: 00001 cut inside its record 2's image, 00003 not a tar at all, record 1 a broken jpeg."""
    folder = tmp_path / "wds"
    folder.mkdir()
    for s in range(5):
        write_shard(folder / f"{s:05d}.tar", s * 4, 4)
    cut = folder / "00001.tar"
    with tarfile.open(cut) as tar:
        offset = tar.getmembers()[4].offset_data  # record 2's jpg
    cut.write_bytes(cut.read_bytes()[: offset + 100])
    (folder / "00003.tar").write_bytes(b"not a tar archive" * 40)
    return folder


@pytest.mark.parametrize(
    "rank,world_size,split_by", [(0, 1, "shard"), (1, 2, "shard"), (0, 2, "sample"), (1, 2, "sample")]
)
def test_webdataset_resume_after_broken_shards_is_exact(tmp_path, rank, world_size, split_by):
    folder = broken_shards(tmp_path)

    def dataset():
        return open_dataset(
            "webdataset", str(folder), "pretrain", seed=5, rank=rank, world_size=world_size, split_by=split_by
        )

    full = dataset().iter_from(1)
    saved = []  # (position, skips so far) after each sample: what a checkpoint holds
    keys = []
    for sample in full:
        keys.append(sample.key)
        saved.append((full.position, Counter(full.skips.counts)))
    if split_by == "shard":  # each rank reads its own shards (split by sample, one rank reports each error)
        assert full.skips.counts["unreadable_shard"] >= 1  # the broken shards are in this rank's part
    for n, (position, skips_before) in enumerate(saved):
        resumed = dataset().iter_from(1, position)
        assert [s.key for s in resumed] == keys[n + 1 :], f"resumed at {position}"
        assert resumed.skips.counts + skips_before == full.skips.counts, f"resumed at {position}"
        assert resumed.position == full.position


@pytest.mark.parametrize("rank,world_size,split_by", [(0, 1, "shard"), (1, 2, "sample")])
def test_bucketed_batches_resume_exactly_after_broken_shards(tmp_path, rank, world_size, split_by):
    """A checkpoint after any batch holds (position, waiting): the samples waiting in the other size's unfinished
    batch are batched again as before, and skips between them are not counted twice."""
    folder = broken_shards(tmp_path)
    options = {"seed": 5, "rank": rank, "world_size": world_size, "split_by": split_by, "buckets": [(12, 8), (8, 12)]}

    def batches_from(position=0, waiting=()):
        # epoch 0 of seed 5: on rank 0 of 1 the cut shard's error falls between a waiting sample and the position
        it = open_dataset("webdataset", str(folder), "pretrain", **options).iter_from(0, position, waiting)
        return it, Batches(it, 2, by_bucket=True)

    full, batches = batches_from()
    saved, keys = [], []  # what a checkpoint after each batch holds
    for batch in batches:
        keys.append([s.key for s in batch])
        saved.append((full.position, batches.waiting, Counter(full.skips.counts)))
    assert sum(map(len, keys)) >= 6 and any(waiting for _, waiting, _ in saved)
    for n, (position, waiting, skips_before) in enumerate(saved):
        resumed, rest = batches_from(position, waiting)
        assert [[s.key for s in b] for b in rest] == keys[n + 1 :], f"resumed at {position}, {waiting}"
        assert resumed.skips.counts + skips_before == full.skips.counts, f"resumed at {position}, {waiting}"
        assert resumed.position == full.position


def test_waiting_positions_must_lie_before_the_resume_position(tmp_path):
    ds = open_dataset("webdataset", str(broken_shards(tmp_path)), "pretrain")
    for waiting in ([3], [1, 1], [-1]):
        with pytest.raises(ValueError, match=r"waiting positions must be distinct and in \[0, 3\), got "):
            ds.iter_from(0, 3, waiting)
    with pytest.raises(TypeError, match="waiting positions need an EpochIterator"):
        _ = Batches(ds, 2).waiting


def test_a_truncation_is_reported_by_the_run_that_reads_past_it(tmp_path):
    folder = broken_shards(tmp_path)
    ds = open_dataset("webdataset", str(folder / "{00001..00002}.tar"), "pretrain", shuffle=False)
    it = ds.iter_from(0)
    assert [(s.key, it.position) for s in it] == [
        ("004", 1),
        ("005", 2),
        ("008", 3),
        ("009", 4),
        ("010", 5),
        ("011", 6),
    ]
    assert it.skips.counts == {"unreadable_shard": 1}
    before, after = ds.iter_from(0, 2), ds.iter_from(0, 3)  # saved after '005' (cut record next) and after '008'
    assert [s.key for s in before] == ["008", "009", "010", "011"] and before.skips.counts == {"unreadable_shard": 1}
    assert [s.key for s in after] == ["009", "010", "011"] and after.skips.counts == {}


def test_a_broken_shard_is_counted_once_however_many_ranks_read_it(tmp_path):
    """Split by sample every rank reads every shard; the summed count must not grow with the process count."""
    folder = broken_shards(tmp_path)

    def unreadable(rank: int, world_size: int) -> int:
        it = open_dataset(
            "webdataset", str(folder), "pretrain", seed=5, rank=rank, world_size=world_size, split_by="sample"
        ).iter_from(0)
        for _ in it:
            pass
        return it.skips.counts["unreadable_shard"]

    alone = unreadable(0, 1)
    assert alone == 2 and unreadable(0, 2) + unreadable(1, 2) == alone  # the cut shard and the non-tar file
