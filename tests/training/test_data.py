"""Tests for training.data: every format and stage, skips, empty data, layouts, determinism, resume, rank split."""

import json

import numpy as np
import pytest
from data_kit import image_cell, image_struct, img_bytes, needs_pyarrow, pa, pq, write_tar
from PIL import Image

from training.data import (
    Batches,
    CaptionSample,
    InstructSample,
    NoUsableSampleError,
    make_buckets,
    nearest_bucket,
    open_dataset,
    resize_and_crop,
    validate_buckets,
)
from training.data.hf import detect_layout
from training.data.webdataset import expand_braces, expand_shards

BROKEN = img_bytes(0, "JPEG")[:40]  # a JPEG header with the image data cut off


def caption_shards(tmp_path, n_shards=3, per_shard=4):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(n_shards):
        recs = []
        for r in range(per_shard):
            i = s * per_shard + r
            caption = f"caption {i}"
            text = {"txt": caption.encode()} if i % 2 else {"json": json.dumps({"caption": caption}).encode()}
            recs.append((f"{i:06d}", {"jpg" if i % 3 else "png": img_bytes(i, "JPEG" if i % 3 else "PNG"), **text}))
        write_tar(folder / f"{s:05d}.tar", recs)
    return folder


def keys(samples):
    return [s.key for s in samples]


def all_samples(ds, epoch=0, start=0):
    return list(ds.iter_from(epoch, start))


# ------------------------------------------------------------------------------------------------------ webdataset


def test_webdataset_pretrain_reads_txt_and_json_captions(tmp_path):
    folder = caption_shards(tmp_path)
    ds = open_dataset("webdataset", str(folder), "pretrain", shuffle=False)
    samples = all_samples(ds)
    assert keys(samples) == [f"{i:06d}" for i in range(12)]
    assert [s.caption for s in samples] == [f"caption {i}" for i in range(12)]
    assert all(isinstance(s, CaptionSample) and s.image.mode == "RGB" and s.image.size == (12, 8) for s in samples)
    brace = open_dataset("webdataset", f"{folder}/{{00000..00001}}.tar", "pretrain", shuffle=False)
    assert keys(all_samples(brace)) == [f"{i:06d}" for i in range(8)]


def test_webdataset_instruct_and_custom_caption_key(tmp_path):
    path = tmp_path / "inst.tar"
    meta = json.dumps({"instruction": "make it red", "alt": "alt text"}).encode()
    a = {"source_1.png": img_bytes(2), "source_0.jpg": img_bytes(1, "JPEG"), "target.png": img_bytes(3), "json": meta}
    b = {"source.webp": img_bytes(4, "WEBP"), "target.jpg": img_bytes(5, "JPEG"), "txt": b"flip it"}
    write_tar(path, [("a", a), ("b", b), ("c", {"target.jpg": img_bytes(5, "JPEG"), "txt": b"no source"})])
    ds = open_dataset("webdataset", str(path), "instruct", shuffle=False)
    samples = all_samples(ds)
    assert [s.instruction for s in samples] == ["make it red", "flip it"]
    assert all(isinstance(s, InstructSample) for s in samples)
    assert len(samples[0].source_images) == 2 and samples[0].source_images[1].getpixel((0, 0))[0] == 2 * 37 % 256
    assert ds.skips.counts == {"missing_source": 1}
    write_tar(tmp_path / "alt.tar", [("k", {"png": img_bytes(1), "json": meta})])
    alt = open_dataset("webdataset", str(tmp_path / "alt.tar"), "pretrain", caption_key="alt")
    assert all_samples(alt)[0].caption == "alt text"


def test_corrupt_jpeg_is_skipped_counted_and_batches_stay_full(tmp_path):
    recs = [(f"{i:03d}", {"jpg": img_bytes(i, "JPEG"), "txt": f"c{i}".encode()}) for i in range(7)]
    recs[2] = ("002", {"jpg": BROKEN, "txt": b"c2"})
    recs[4] = ("004", {"jpg": img_bytes(4, "JPEG"), "txt": b"   "})
    recs.append(("007", {"txt": b"no image"}))
    write_tar(tmp_path / "s.tar", recs)
    ds = open_dataset("webdataset", str(tmp_path / "s.tar"), "pretrain", shuffle=False)
    it = ds.iter_from(0)
    batches = list(Batches(it, 2))
    assert [len(b) for b in batches] == [2, 2]  # 5 usable samples: the 5th waits for a partner and is dropped
    assert keys(batches[0] + batches[1]) == ["000", "001", "003", "005"]
    assert it.skips.counts == {"decode_error": 1, "missing_caption": 1, "missing_image": 1}
    assert it.skips.as_metrics()["data/skipped/total"] == 3 and it.position == 8
    assert str(it.skips) == "3 skipped (decode_error: 1, missing_caption: 1, missing_image: 1)"
    assert [len(b) for b in Batches(ds.iter_from(0), 4, drop_last=False)] == [4, 1]


def test_truncated_shard_is_counted_and_the_rest_is_read(tmp_path):
    folder = caption_shards(tmp_path, n_shards=2)
    data = (folder / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(data[: 512 + 300])  # first member's header + part of its data
    ds = open_dataset("webdataset", str(folder), "pretrain", shuffle=False)
    assert keys(all_samples(ds)) == [f"{i:06d}" for i in range(4, 8)]
    assert ds.skips.counts == {"unreadable_shard": 1}


def test_shard_expansion(tmp_path):
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    folder = caption_shards(tmp_path, n_shards=2)
    assert len(expand_shards(str(folder))) == len(expand_shards(f"{folder}/*.tar")) == 2
    assert len(expand_shards([f"{folder}/00000.tar", f"{folder}/00001.tar"])) == 2
    with pytest.raises(FileNotFoundError, match=r"1 shard path\(s\) from .* do not exist: '.*00002.tar'"):
        expand_shards(f"{folder}/{{00000..00002}}.tar")
    with pytest.raises(FileNotFoundError, match="no \\*.tar shard in directory"):
        expand_shards(str(tmp_path))


# -------------------------------------------------------------------------------------------------- hugging face


def write_caption_parquet(folder, n=10, text_col="text", row_group_size=4, raw_bytes=False):
    folder.mkdir(parents=True, exist_ok=True)
    images = [img_bytes(i) for i in range(n)] if raw_bytes else [image_cell(i) for i in range(n)]
    typ = pa.binary() if raw_bytes else image_struct()
    table = pa.table(
        {"image": pa.array(images, typ), text_col: [f"caption {i}" for i in range(n)], "extra": list(range(n))}
    )
    pq.write_table(table, folder / "part-0.parquet", row_group_size=row_group_size)
    return folder


def write_save_to_disk(folder, table):
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=3)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return folder


def metaquery_table(n=6):
    return pa.table(
        {
            "source_images": pa.array(
                [[image_cell(i), image_cell(i + 1)][: 1 + i % 2] for i in range(n)], pa.list_(image_struct())
            ),
            "prompt": [f"edit {i}" for i in range(n)],
            "target_image": pa.array([image_cell(100 + i) for i in range(n)], image_struct()),
        }
    )


@needs_pyarrow
def test_hf_parquet_caption_layout(tmp_path):
    folder = write_caption_parquet(tmp_path / "cap")
    ds = open_dataset("hf", str(folder), "pretrain", shuffle=False)
    assert ds.layout.name == "caption" and len(ds) == 10
    samples = all_samples(ds)
    assert [s.caption for s in samples] == [f"caption {i}" for i in range(10)]
    assert samples[3].image.getpixel((0, 0)) == (3 * 37 % 256, 3 * 11 % 256, 200)
    raw = open_dataset("hf", str(write_caption_parquet(tmp_path / "raw", 4, "caption", raw_bytes=True)), "pretrain")
    assert sorted(s.caption for s in raw) == [f"caption {i}" for i in range(4)]
    by_path = tmp_path / "paths"
    (by_path / "imgs").mkdir(parents=True)
    (by_path / "imgs" / "a.png").write_bytes(img_bytes(7))
    cells = [{"bytes": None, "path": "imgs/a.png"}, {"bytes": None, "path": "imgs/gone.png"}, None]
    table = pa.table({"image": pa.array(cells, image_struct()), "caption": ["a", "gone", "null"]})
    pq.write_table(table, by_path / "x.parquet")
    ds = open_dataset("hf", str(by_path / "x.parquet"), "pretrain")
    assert [s.caption for s in ds] == ["a"] and ds.skips.counts == {"missing_image": 2}


@needs_pyarrow
def test_hf_save_to_disk_metaquery_instruct(tmp_path):
    folder = write_save_to_disk(tmp_path / "mq", metaquery_table())
    ds = open_dataset("hf", str(folder), "instruct", shuffle=False)
    assert ds.layout.name == "metaquery_instruct"
    samples = all_samples(ds)
    assert [s.instruction for s in samples] == [f"edit {i}" for i in range(6)]
    assert [len(s.source_images) for s in samples] == [1, 2, 1, 2, 1, 2]
    assert samples[2].target.getpixel((0, 0))[0] == 102 * 37 % 256


@needs_pyarrow
def test_hf_omniedit_in_data_folder_with_splits(tmp_path):
    data = tmp_path / "omni" / "data"
    data.mkdir(parents=True)
    prompts = [[f"p{i}a", f"p{i}b", f"p{i}c"] for i in range(8)]
    table = pa.table(
        {
            "src_img": pa.array([image_cell(i) for i in range(8)], image_struct()),
            "edited_img": pa.array([image_cell(50 + i, "JPEG") for i in range(8)], image_struct()),
            "edited_prompt_list": prompts,
        }
    )
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 2), data / "test-00000-of-00001.parquet")
    first = open_dataset("hf", str(tmp_path / "omni"), "instruct", shuffle=False, prompt_choice="first")
    assert first.layout.name == "omniedit" and len(first) == 8  # the test split is left out
    assert [s.instruction for s in first] == [f"p{i}a" for i in range(8)]
    drawn = [s.instruction for s in open_dataset("hf", str(tmp_path / "omni"), "instruct", shuffle=False)]
    assert drawn == [s.instruction for s in open_dataset("hf", str(tmp_path / "omni"), "instruct", shuffle=False)]
    assert all(d in p for d, p in zip(drawn, prompts)) and len({d[-1] for d in drawn}) > 1


@needs_pyarrow
def test_layout_detection_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"no instruct layout matches the columns \['extra', 'image', 'text'\]; .*omniedit"
    ):
        open_dataset("hf", str(write_caption_parquet(tmp_path / "c")), "instruct")
    with pytest.raises(ValueError, match=r"layout 'omniedit' gives instruct samples, but stage is 'pretrain'"):
        detect_layout(["src_img"], "pretrain", "omniedit")
    with pytest.raises(ValueError, match=r"layout 'omniedit' needs columns src_img \+ edited_prompt_list"):
        detect_layout(["src_img", "prompt"], "instruct", "omniedit")
    with pytest.raises(ValueError, match=r"unknown layout 'x'; allowed: \['auto', 'caption'"):
        detect_layout(["image"], "pretrain", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        open_dataset("hf", str(tmp_path / "empty"), "pretrain")


@needs_pyarrow
def test_files_with_other_column_names_are_refused_when_the_dataset_opens(tmp_path):
    folder = write_caption_parquet(tmp_path / "pq", n=4, text_col="caption")
    table = pa.table({"image": pa.array([image_cell(i) for i in range(4)], image_struct()), "other": list(range(4))})
    pq.write_table(table.append_column("caption", pa.array(["c"] * 4)), folder / "part-1.parquet")
    assert len(open_dataset("hf", str(folder), "pretrain")) == 8  # other extra columns are fine
    pq.write_table(table.append_column("text", pa.array(["c"] * 4)), folder / "part-2.parquet")
    with pytest.raises(ValueError, match=r"part-2.parquet' has columns \['image', 'other', 'text'\], without \['capt"):
        open_dataset("hf", str(folder), "pretrain")
    arrow = write_save_to_disk(tmp_path / "arrow", table.append_column("caption", pa.array(["c"] * 4)))
    with pa.OSFile(str(arrow / "data-1.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    files = [{"filename": "data-00000-of-00001.arrow"}, {"filename": "data-1.arrow"}]
    (arrow / "state.json").write_text(json.dumps({"_data_files": files}))
    with pytest.raises(ValueError, match=r"layout 'caption' \(detected from .*data-00000-of-00001.arrow'\) reads"):
        open_dataset("hf", str(arrow), "pretrain")


def test_missing_pyarrow_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        open_dataset("hf", str(tmp_path), "pretrain")


# ----------------------------------------------------------------------------------------------------------- jsonl


def write_jsonl(folder, lines, images):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "manifest.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return folder


def test_jsonl_pretrain_with_bad_lines(tmp_path):
    lines = [{"image": f"img/{i}.png", "caption": f"c{i}"} for i in range(4)]
    lines += ["{not json", {"image": "img/missing.png", "caption": "x"}, "", {"image": "img/0.png"}, [1]]
    folder = write_jsonl(
        tmp_path / "j", lines, {f"img/{i}.png": img_bytes(i, size=(9, 9), mode="RGBA") for i in range(4)}
    )
    ds = open_dataset("jsonl", folder, "pretrain", shuffle=False)  # a pathlib.Path works too
    samples = all_samples(ds)
    assert [s.caption for s in samples] == ["c0", "c1", "c2", "c3"] and samples[0].key == "manifest.jsonl:1"
    assert samples[1].image.mode == "RGB"
    assert ds.skips.counts == {"bad_metadata": 2, "missing_image": 1, "missing_caption": 1}


def test_jsonl_instruct(tmp_path):
    lines = [{"source_images": ["a.png", "b.png"], "instruction": "swap", "target": "t.png", "key": "k0"}]
    lines.append({"source_images": "a.png", "instruction": "one", "target": "t.png"})
    lines.append({"source_images": [], "instruction": "none", "target": "t.png"})
    folder = write_jsonl(tmp_path / "i", lines, {"a.png": img_bytes(1), "b.png": img_bytes(2), "t.png": img_bytes(3)})
    samples = all_samples(open_dataset("jsonl", str(folder / "manifest.jsonl"), "instruct", shuffle=False))
    assert [(s.key, s.instruction, len(s.source_images)) for s in samples] == [
        ("k0", "swap", 2),
        ("manifest.jsonl:2", "one", 1),
    ]


# --------------------------------------------------------------------------------------------------- common rules


def build(tmp_path, fmt):
    """A 20-record pretrain dataset of format ``fmt`` whose record 5 is a corrupt image: (kind, path)."""
    if fmt in ("parquet", "arrow") and pa is None:
        pytest.skip("pyarrow is not installed (pip install pyarrow)")
    recs = [(f"{i:03d}", {"png": BROKEN if i == 5 else img_bytes(i), "txt": f"c{i}".encode()}) for i in range(20)]
    if fmt == "webdataset":
        (tmp_path / "wds").mkdir()
        for s in range(5):
            write_tar(tmp_path / "wds" / f"{s:05d}.tar", recs[s * 4 : s * 4 + 4])
        return "webdataset", str(tmp_path / "wds")
    if fmt == "jsonl":
        images = {f"{i}.png": data["png"] for i, (_, data) in enumerate(recs)}
        lines = [{"image": f"{i}.png", "caption": f"c{i}"} for i in range(20)]
        return "jsonl", str(write_jsonl(tmp_path / "jl", lines, images))
    cells = [{"bytes": data["png"], "path": None} for _, data in recs]
    table = pa.table({"image": pa.array(cells, image_struct()), "caption": [f"c{i}" for i in range(20)]})
    if fmt == "arrow":
        return "hf", str(write_save_to_disk(tmp_path / "arrow", table))
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "d.parquet", row_group_size=6)
    return "hf", str(tmp_path / "pq")


FORMATS = ["webdataset", "parquet", "arrow", "jsonl"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_determinism_per_seed_and_epoch(tmp_path, fmt):
    kind, path = build(tmp_path, fmt)
    order = [s.caption for s in open_dataset(kind, path, "pretrain", seed=1).iter_from(0)]
    assert order == [s.caption for s in open_dataset(kind, path, "pretrain", seed=1).iter_from(0)]
    assert sorted(order) == sorted(f"c{i}" for i in range(20) if i != 5)
    assert order != [s.caption for s in open_dataset(kind, path, "pretrain", seed=1).iter_from(1)]
    assert order != [s.caption for s in open_dataset(kind, path, "pretrain", seed=2).iter_from(0)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_from_index_equals_tail(tmp_path, fmt):
    kind, path = build(tmp_path, fmt)
    opts = {"seed": 3, "resolution": 6, "random_crop": True}
    full = open_dataset(kind, path, "pretrain", **opts).iter_from(2)
    positions = []  # (position after the sample, sample)
    for sample in full:
        positions.append((full.position, sample))
    for k in (0, 1, 7, 13, 20):
        resumed = list(open_dataset(kind, path, "pretrain", **opts).iter_from(2, k))
        tail = [s for p, s in positions if p > k]
        assert [(s.key, s.caption) for s in resumed] == [(s.key, s.caption) for s in tail]
        assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(resumed, tail))


@pytest.mark.parametrize("fmt,split_by", [("webdataset", "sample")] + [(f, None) for f in FORMATS])
def test_rank_split_partitions_the_data(tmp_path, fmt, split_by):
    kind, path = build(tmp_path, fmt)
    extra = {"split_by": split_by} if split_by else {}
    per_rank = [
        [s.caption for s in open_dataset(kind, path, "pretrain", seed=4, rank=r, world_size=3, **extra)]
        for r in range(3)
    ]
    flat = [c for part in per_rank for c in part]
    assert len(flat) == len(set(flat)) == 19 and all(per_rank)


def test_no_usable_sample_is_a_clear_error(tmp_path):
    write_tar(tmp_path / "bad.tar", [(f"{i}", {"jpg": BROKEN, "txt": b"x"}) for i in range(3)])
    ds = open_dataset("webdataset", str(tmp_path / "bad.tar"), "pretrain")
    with pytest.raises(NoUsableSampleError, match=r"no usable sample in .*bad.tar: 3 skipped \(decode_error: 3\)"):
        list(ds)
    write_jsonl(tmp_path / "empty", ["", " "], {})
    with pytest.raises(NoUsableSampleError, match="no non-blank line"):
        open_dataset("jsonl", str(tmp_path / "empty"), "pretrain")


def test_open_dataset_rejects_bad_arguments(tmp_path):
    folder = caption_shards(tmp_path, n_shards=1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['layout'\] for dataset kind 'webdataset'; allowed: "):
        open_dataset("webdataset", str(folder), "pretrain", layout="caption")
    with pytest.raises(ValueError, match=r"unknown dataset kind 'tar'; allowed"):
        open_dataset("tar", str(folder), "pretrain")
    with pytest.raises(ValueError, match=r"unknown stage 'sft'; allowed: \['pretrain', 'instruct'\]"):
        open_dataset("webdataset", str(folder), "sft")
    with pytest.raises(ValueError, match=r"0 <= rank < world_size"):
        open_dataset("webdataset", str(folder), "pretrain", rank=2, world_size=2)
    with pytest.raises(ValueError, match="split_by='shard' needs at least world_size=2 shards"):
        open_dataset("webdataset", str(folder), "pretrain", rank=0, world_size=2, split_by="shard")


# ------------------------------------------------------------------------------------------ images and transforms


def test_resize_and_crop():
    image = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3))
    assert resize_and_crop(image, 10).size == (10, 10)
    assert resize_and_crop(image, (16, 12)).size == (16, 12)
    centre = np.asarray(resize_and_crop(image, 10))
    assert np.array_equal(centre, np.asarray(image.resize((20, 10), Image.Resampling.LANCZOS))[:, 5:15])
    crops = {resize_and_crop(image, 10, True, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(crops) > 1
    a = resize_and_crop(image, 10, True, np.random.default_rng(0))
    assert a.tobytes() == resize_and_crop(image, 10, True, np.random.default_rng(0)).tobytes()
    with pytest.raises(ValueError, match="random_crop=True needs an rng"):
        resize_and_crop(image, 10, True)


def test_buckets_and_bucketed_batches(tmp_path):
    buckets = make_buckets(256, multiple=32)
    areas = [w * h for w, h in buckets]
    assert max(areas) <= min(areas) * 1.25 and (256, 256) in buckets
    assert nearest_bucket((400, 200), [(16, 8), (8, 8), (8, 16)]) == (16, 8)
    assert nearest_bucket((100, 290), [(16, 8), (8, 8), (8, 16)]) == (8, 16)
    with pytest.raises(ValueError, match="about equal area"):
        validate_buckets([(256, 256), (64, 64)])
    lines, images = [], {}
    for i in range(9):
        size = (24, 12) if i % 3 else (12, 12)  # 6 wide images, 3 square ones
        images[f"{i}.png"] = img_bytes(i, size=size)
        lines.append({"image": f"{i}.png", "caption": f"c{i}"})
    folder = write_jsonl(tmp_path / "b", lines, images)
    ds = open_dataset("jsonl", str(folder), "pretrain", buckets=[(16, 8), (12, 12), (8, 16)])
    batches = list(Batches(ds, 3, by_bucket=True))
    assert sorted(len(b) for b in batches) == [3, 3, 3]
    assert sorted({s.image.size for s in b}.pop() for b in batches) == [(12, 12), (16, 8), (16, 8)]
    assert all(len({s.image.size for s in b}) == 1 for b in batches)


def test_toyworld_instruct_mixes_in_captions_and_keeps_the_old_draws_without_them():
    from itertools import islice

    from metaqueries_core.toyworld import ToyWorld
    from training.datasets import ToyWorldData

    world = ToyWorld(size=32, seed=0)

    def first(n: int, **kw) -> list[InstructSample]:
        return list(islice(ToyWorldData(world, "instruct", seed=0, **kw).iter_from(0), n))

    mixed = first(40, caption_fraction=0.5)
    plain = [s for s in mixed if not s.source_images]
    assert 10 <= len(plain) <= 30  # about half
    for s in plain:  # a caption sample of the same row, target = its image
        row = int(s.key.split("#")[1])
        c = world.caption_sample("train", row)
        assert s.instruction == c.caption and s.target.tobytes() == c.image.tobytes()
    # without captions the stream is exactly what it was before the option existed (same draws, same rows)
    default, zero = first(20), first(20, caption_fraction=0.0)
    assert [(s.key, s.instruction) for s in default] == [(s.key, s.instruction) for s in zero]
    assert all(s.source_images for s in default)


def test_toyworld_shares_are_checked():
    from training.config import DataSection

    with pytest.raises(ValueError, match="adding up to at most 1"):
        DataSection(toyworld_subject_fraction=0.6, toyworld_caption_fraction=0.5)
    with pytest.raises(ValueError, match="shares in"):
        DataSection(toyworld_caption_fraction=-0.1)


def test_toyworld_caption_mix_weighs_the_caption_kinds():
    from collections import Counter
    from itertools import islice

    from metaqueries_core.toyworld import ToyWorld
    from training.config import DataSection
    from training.datasets import ToyWorldData

    world = ToyWorld(size=32, seed=0)

    def rows(n: int, **kw) -> list[CaptionSample]:
        return list(islice(ToyWorldData(world, "pretrain", seed=0, **kw).iter_from(0), n))

    got = rows(80, caption_mix={"relation": 3.0, "placed_many": 1.0})
    # each row is the world's caption of that row in the kind the mix drew
    kinds = {}
    for s in got:
        row = int(s.key.split("#")[1])
        matches = [
            k for k in ("relation", "placed_many") if world.caption_sample("train", row, (k,)).caption == s.caption
        ]
        assert len(matches) == 1
        kinds[s.key] = matches[0]
    counts = Counter(kinds.values())
    assert 45 <= counts["relation"] <= 75 and counts["placed_many"] >= 8
    for s in got:
        scene = world.caption_sample("train", int(s.key.split("#")[1]), (kinds[s.key],)).scene
        if kinds[s.key] == "placed_many":  # 2-3 objects, every one claimed at its region
            assert (
                scene.layout == "placed"
                and len(scene.objects) in (2, 3)
                and s.caption.count(" and ") == len(scene.objects) - 1
            )
        else:
            assert scene.layout == "relation"
    # unset: the world's own natural mix, row by row
    assert [s.caption for s in rows(10)] == [world.caption_sample("train", i).caption for i in range(10)]
    with pytest.raises(ValueError, match="unknown caption kinds"):
        world.caption_sample("train", 0, ("placed", "many"))
    with pytest.raises(ValueError, match="unknown kinds"):
        DataSection(toyworld_caption_mix={"relations": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        DataSection(toyworld_caption_mix={"relation": 0.0})
