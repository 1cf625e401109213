"""Ingest sources: folders with sidecars, JSONL and Parquet manifests, WebDataset shards; bad sources exit 2."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pony_common.errors import InvalidArgument
from services.curation.categories import category_of
from services.curation.sources import iter_source, split_tags


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_split_tags_normalises_booru_tags() -> None:
    assert split_tags("long_hair, 1girl,  blue eyes ,long_hair,^_^,") == ["long hair", "1girl", "blue eyes", "^_^"]
    assert split_tags(["a_b_c", "x"]) == ["a b c", "x"]
    assert split_tags(None) == []


def test_folder_with_txt_and_json_sidecars(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "a.txt").write_text("twilight_sparkle, my_little_pony, smile\n")
    (tmp_path / "sub" / "b.png").write_bytes(_png((0, 255, 0)))
    (tmp_path / "sub" / "b.json").write_text(
        json.dumps(
            {
                "tags": ["fox", "anthro"],
                "characters": ["Rusty"],
                "artist": "pawz",
                "category": "Furry",
                "source": "e621",
            }
        )
    )
    (tmp_path / "c.jpg.txt").write_text("orphan sidecar")
    items = list(iter_source(str(tmp_path)))
    assert [Path(i.uri).name for i in items] == ["a.png", "b.png"]
    a, b = items
    assert a.tags == ["twilight sparkle", "my little pony", "smile"] and a.category is None
    assert category_of(a.category, a.tags) == "pony"
    assert (b.tags, b.characters, b.artist, b.source_site) == (["fox", "anthro"], ["Rusty"], "pawz", "e621")
    assert category_of(b.category, b.tags) == "furry"


def test_jsonl_and_parquet_manifests(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.png").write_bytes(_png((1, 2, 3)))
    absolute = tmp_path / "abs.png"
    absolute.write_bytes(_png((4, 5, 6)))
    records = [
        {
            "uri": "img/1.png",
            "tags": "a, b",
            "source_site": "danbooru",
            "artist": "x",
            "category": "anime",
            "characters": ["Aoi"],
        },
        {"uri": str(absolute), "tags": ["c"], "category": "photo"},
        {"uri": "img/missing.png", "tags": []},
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = list(iter_source(str(jsonl)))
    assert [i.tags for i in items] == [["a", "b"], ["c"], []]
    assert items[0].source_site == "danbooru" and items[0].characters == ["Aoi"] and items[0].data
    assert category_of(items[1].category, items[1].tags) == "realism"
    assert items[2].error and "missing.png" in items[2].error

    table = pa.table({"uri": ["img/1.png"], "tags": [["a", "b"]], "category": ["anime"], "artist": ["x"]})
    pq.write_table(table, tmp_path / "m.parquet")
    (item,) = list(iter_source(str(tmp_path / "m.parquet")))
    assert item.tags == ["a", "b"] and item.data == (tmp_path / "img" / "1.png").read_bytes()


def test_webdataset_shards(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, color, meta in [("k1", (9, 9, 9), {"tags": ["t1"], "category": "western"}), ("k2", (8, 8, 8), None)]:
            for name, data in [
                (f"{key}.png", _png(color)),
                *([(f"{key}.json", json.dumps(meta).encode())] if meta else []),
                *([(f"{key}.txt", b"t2, t3")] if not meta else []),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for source in (str(shard), str(tmp_path), str(tmp_path / "shard-*.tar")):
        items = list(iter_source(source))
        assert [i.uri.rsplit("#", 1)[1] for i in items] == ["k1.png", "k2.png"]
        assert items[0].category == "western" and items[0].tags == ["t1"]
        assert items[1].tags == ["t2", "t3"]


def test_unknown_sources_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no such"):
        iter_source(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InvalidArgument, match="not a folder"):
        iter_source(str(tmp_path / "x.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(InvalidArgument, match="not a JSON object"):
        list(iter_source(str(bad)))
