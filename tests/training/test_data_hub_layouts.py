"""Public datasets as they lie on disk: img2dataset's parquet output, webdataset shards saved by `datasets`,
`load_dataset` caches and Hub folders with several splits or snapshots, and how parquet is shared by processes."""

import pytest
from data_kit import image_cell, image_struct, img_bytes, needs_pyarrow, pa, pq, write_tar

from training.config import RunConfig
from training.config_io import load_config
from training.data import open_dataset
from training.datasets import open_training_data


def captions(ds):
    return sorted(s.caption for s in ds)


def write_arrow(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def caption_table(name, n):
    cells = pa.array([image_cell(i) for i in range(n)], image_struct())
    return pa.table({"image": cells, "caption": [f"{name} {i}" for i in range(n)]})


@needs_pyarrow
def test_img2dataset_parquet_output_and_webdataset_columns(tmp_path):
    # img2dataset --output_format parquet: jpg bytes beside the caption; failed downloads keep a null jpg
    table = pa.table(
        {
            "caption": ["a", "b", "failed"],
            "url": ["u0", "u1", "u2"],
            "key": ["000000000", "000000001", "000000002"],
            "status": ["success", "success", "failed_to_download"],
            "jpg": pa.array([img_bytes(0, "JPEG"), img_bytes(1, "JPEG"), None], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    ds = open_dataset("hf", str(tmp_path / "00000.parquet"), "pretrain")
    assert ds.columns == {"image": "jpg", "text": "caption"} and captions(ds) == ["a", "b"]
    assert ds.skips.counts == {"missing_image": 1}
    # shards read by `datasets` (e.g. pixparse/cc12m-wds): jpg as the Image feature, txt, json, __key__, __url__
    wds = pa.table(
        {
            "jpg": pa.array([image_cell(2, "JPEG")], image_struct()),
            "txt": ["a fox"],
            "json": [{"width": 8}],
            "__key__": ["k"],
            "__url__": ["cc12m-train-0000.tar"],
        }
    )
    write_arrow(tmp_path / "wds" / "data-00000-of-00001.arrow", wds)
    assert captions(open_dataset("hf", str(tmp_path / "wds"), "pretrain")) == ["a fox"]


@needs_pyarrow
def test_split_files_of_arrow_caches_and_nested_folders(tmp_path):
    # a load_dataset cache: one arrow file per split side by side, no state.json
    cache = tmp_path / "cache"
    write_arrow(cache / "parquet-train.arrow", caption_table("train", 3))
    write_arrow(cache / "parquet-validation.arrow", caption_table("validation", 2))
    assert captions(open_dataset("hf", str(cache), "pretrain")) == ["train 0", "train 1", "train 2"]
    assert captions(open_dataset("hf", str(cache), "pretrain", split="validation")) == ["validation 0", "validation 1"]
    # arrow shards one folder down, as a Hub repo keeps them
    hub = tmp_path / "hub"
    write_arrow(hub / "data" / "train-00000-of-00002.arrow", caption_table("a", 2))
    write_arrow(hub / "data" / "train-00001-of-00002.arrow", caption_table("b", 1))
    assert captions(open_dataset("hf", str(hub), "pretrain")) == ["a 0", "a 1", "b 0"]
    # only other splits: refused, naming them
    dev = tmp_path / "dev_only"
    dev.mkdir()
    pq.write_table(caption_table("dev", 2), dev / "dev-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"no \*.parquet file of split 'train' in .*split\(s\) \['dev'\]"):
        open_dataset("hf", str(dev), "pretrain")
    assert captions(open_dataset("hf", str(dev), "pretrain", split="dev")) == ["dev 0", "dev 1"]


@needs_pyarrow
def test_a_hub_cache_with_two_snapshots_is_refused(tmp_path):
    for revision in ("abc", "def"):
        folder = tmp_path / "datasets--x--y" / "snapshots" / revision / "data"
        folder.mkdir(parents=True)
        pq.write_table(caption_table(revision, 2), folder / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"holds 2 snapshots of a Hugging Face cache \(\['abc', 'def'\]\)"):
        open_dataset("hf", str(tmp_path / "datasets--x--y"), "pretrain")
    one = tmp_path / "datasets--x--y" / "snapshots" / "abc"
    assert captions(open_dataset("hf", str(one), "pretrain")) == ["abc 0", "abc 1"]


def test_webdataset_folder_reads_the_split_its_shard_names_carry(tmp_path):
    for split, n in (("train", 3), ("validation", 2)):
        recs = [(f"{split}{i}", {"jpg": img_bytes(i, "JPEG"), "txt": f"{split} {i}".encode()}) for i in range(n)]
        write_tar(tmp_path / f"cc3m-{split}-0000.tar", recs)
    assert captions(open_dataset("webdataset", str(tmp_path), "pretrain")) == ["train 0", "train 1", "train 2"]
    chosen = open_dataset("webdataset", str(tmp_path), "pretrain", split="validation")
    assert captions(chosen) == ["validation 0", "validation 1"]
    explicit = open_dataset("webdataset", str(tmp_path / "*.tar"), "pretrain")  # a glob is taken as given
    assert len(captions(explicit)) == 5


@needs_pyarrow
def test_prompt_choice_last_takes_the_reference_trainers_phrasing(tmp_path):
    table = pa.table(
        {
            "src_img": pa.array([image_cell(0)], image_struct()),
            "edited_img": pa.array([image_cell(1)], image_struct()),
            "edited_prompt_list": [["first phrasing", "last phrasing"]],
        }
    )
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    ds = open_dataset("hf", str(tmp_path), "instruct", prompt_choice="last")
    assert [s.instruction for s in ds] == ["last phrasing"]


@needs_pyarrow
@pytest.mark.parametrize("world_size", [2, 3])
def test_parquet_processes_read_whole_row_groups(tmp_path, world_size):
    """split_by='shard' (the default with enough row groups): each row group is read by one process only, and the
    processes still partition the data, every epoch."""
    pq.write_table(caption_table("r", 20), tmp_path / "d.parquet", row_group_size=3)  # 7 row groups
    for epoch in (0, 1):
        parts = []
        for rank in range(world_size):
            ds = open_dataset("hf", str(tmp_path), "pretrain", seed=4, rank=rank, world_size=world_size)
            assert ds.split_by == "shard"
            parts.append({int(s.caption.split()[1]) for s in ds.iter_from(epoch)})
        assert sorted(n for part in parts for n in part) == list(range(20))
        groups = [{n // 3 for n in part} for part in parts]
        assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])  # no group on two ranks
    rows = open_dataset("hf", str(tmp_path), "pretrain", seed=4, rank=0, world_size=2, split_by="sample")
    assert len({n // 3 for n in (int(s.caption.split()[1]) for s in rows)}) == 7  # every group decoded
    with pytest.raises(ValueError, match=r"split_by='shard' needs at least world_size=8 parquet row groups, found 7"):
        open_dataset("hf", str(tmp_path), "pretrain", rank=0, world_size=8, split_by="shard")


@needs_pyarrow
def test_format_options_from_the_run_config(tmp_path):
    data = tmp_path / "omni" / "data"
    data.mkdir(parents=True)
    for split in ("train", "dev"):
        table = pa.table(
            {
                "src_img": pa.array([image_cell(0)], image_struct()),
                "edited_img": pa.array([image_cell(1)], image_struct()),
                "edited_prompt_list": [[f"{split} a", f"{split} b"]],
            }
        )
        pq.write_table(table, data / f"{split}-00000-of-00001.parquet")
    args = ["--data.kind=hf", f"--data.path={tmp_path / 'omni'}", "--train.stage=instruct"]
    cfg = load_config(RunConfig, None, [*args, "--data.split=dev", "--data.prompt_choice=last"])
    assert [s.instruction for s in open_training_data(cfg, rank=0, world_size=1)] == ["dev b"]
    with pytest.raises(ValueError, match=r"data.caption_key is not an option of data.kind='hf' \(its format options: "):
        load_config(RunConfig, None, [*args, "--data.caption_key=alt"])
    with pytest.raises(ValueError, match=r"data.layout, data.split is not an option of data.kind='jsonl' \(its format"):
        load_config(RunConfig, None, ["--data.kind=jsonl", "--data.layout=caption", "--data.split=dev"])
