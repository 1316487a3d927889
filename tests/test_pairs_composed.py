"""Composed pairs (a reference image plus an edit text): the `image` field of JSONL and the
`image` column of CSV/TSV, and reference images that are missing or not readable images,
each reported with its file and line at load time."""

from __future__ import annotations

import pytest
from PIL import Image

from grape_cli.errors import InputError
from grape_cli.pairs import load_pairs
from grape_cli.query import Query

from .test_eval import jsonl, write


def image(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_jsonl_reference_image_is_relative_to_the_pairs_file(tmp_path):
    ref = image(tmp_path / "data" / "refs" / "dress.jpg")
    p = jsonl(
        tmp_path / "data" / "pairs.jsonl",
        [
            {"query": "like this one but red", "image": "refs/dress.jpg", "target": "t.jpg"},
            {"query": "a plain text query", "target": "u.jpg"},
        ],
    )
    composed, plain = load_pairs(p)
    assert composed.query == Query("like this one but red", image=str(ref))
    assert composed.query.composed and composed.targets == (str(tmp_path / "data" / "t.jpg"),)
    assert plain.query.image is None and not plain.query.composed


def test_targets_list_with_a_reference_image(tmp_path):
    ref = image(tmp_path / "ref.png")
    p = jsonl(
        tmp_path / "p.jsonl",
        [{"query": "same but at night", "image": str(ref), "targets": ["a.jpg", "sub/b.jpg"]}],
    )
    (pair,) = load_pairs(p)
    assert pair.query.image == str(ref)
    assert pair.targets == (str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b.jpg"))


def test_csv_image_column_an_empty_cell_is_no_image(tmp_path):
    ref = image(tmp_path / "ref.jpg")
    p = write(
        tmp_path / "p.csv",
        'query,image,target\n"but red, please",ref.jpg,t.jpg\nplain,,u.jpg\n',
    )
    first, second = load_pairs(p)
    assert first.query == Query("but red, please", image=str(ref))
    assert second.query == Query("plain") and second.line == 3


def test_tsv_image_column_with_several_targets(tmp_path):
    ref = image(tmp_path / "refs" / "r.webp")
    p = write(tmp_path / "p.tsv", "query\ttargets\timage\nbut blue\ta.jpg|b.jpg\trefs/r.webp\n")
    (pair,) = load_pairs(p)
    assert pair.query == Query("but blue", image=str(ref))
    assert pair.targets == (str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))


def test_the_same_pair_with_another_reference_is_another_pair(tmp_path):
    image(tmp_path / "a.jpg")
    image(tmp_path / "b.jpg")
    line = {"query": "but red", "target": "t.jpg"}
    p = jsonl(tmp_path / "p.jsonl", [{**line, "image": "a.jpg"}, {**line, "image": "b.jpg"}])
    assert [x.line for x in load_pairs(p)] == [1, 2]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_missing_reference_image_names_its_line(tmp_path, suffix):
    image(tmp_path / "ok.jpg")
    if suffix == "jsonl":
        p = jsonl(
            tmp_path / "p.jsonl",
            [
                {"query": "a", "image": "ok.jpg", "target": "t.jpg"},
                {"query": "b", "image": "gone.jpg", "target": "t.jpg"},
            ],
        )
    else:
        p = write(tmp_path / "p.csv", "query,image,target\na,ok.jpg,t.jpg\nb,gone.jpg,t.jpg\n")
    where = ":2:" if suffix == "jsonl" else ":3:"
    with pytest.raises(InputError) as err:
        load_pairs(p)
    assert f"{p}{where} reference image {tmp_path / 'gone.jpg'}: no such file" in err.value.message
    assert "'image'" in err.value.hint


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("garbage.jpg", lambda p: p.write_bytes(b"this is not a photo at all")),
        ("empty.png", lambda p: p.write_bytes(b"")),
        ("header.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00")),
        ("folder.jpg", lambda p: p.mkdir()),
    ],
)
def test_an_unreadable_reference_image_names_its_line(tmp_path, name, make):
    image(tmp_path / "ok.jpg")
    make(tmp_path / name)
    p = jsonl(
        tmp_path / "p.jsonl",
        [
            {"query": "fine", "image": "ok.jpg", "target": "t.jpg"},
            {"query": "broken", "image": name, "target": "t.jpg"},
        ],
    )
    with pytest.raises(InputError) as err:
        load_pairs(p)
    message = err.value.message
    assert message.startswith(f"{p}:2: reference image {tmp_path / name}")
    assert len(str(err.value).splitlines()) == 1 and err.value.hint
    assert ("a folder, not an image" if name == "folder.jpg" else "not a readable image") in message


def test_a_decompression_bomb_is_one_error_without_decoding(tmp_path, monkeypatch):
    image(tmp_path / "huge.png", size=(64, 64))  # 4,096 pixels, over twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    p = write(tmp_path / "p.csv", "query,target,image\nbut red,t.jpg,huge.png\n")
    with pytest.raises(InputError, match=r"p\.csv:2: reference image .*huge\.png is not a read"):
        load_pairs(p)


def test_only_the_header_is_read(tmp_path):
    """A file whose header is whole but whose pixels are cut off loads: decoding it is the
    reader's job, and reading every image in full here would cost a decode per pair."""
    ref = image(tmp_path / "cut.png", size=(32, 32))
    ref.write_bytes(ref.read_bytes()[:60])
    p = jsonl(tmp_path / "p.jsonl", [{"query": "but red", "image": "cut.png", "target": "t"}])
    assert load_pairs(p)[0].query.image == str(ref)
