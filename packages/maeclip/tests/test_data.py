from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from verger.maeclip.data import (
    DIGIT_NAMES,
    CsvImageText,
    ImageTextCollate,
    ImageTextSet,
    WebDatasetShards,
    denormalize_images,
    emoji_pairs,
    normalize_images,
    train_test_split,
    write_webdataset_shards,
)


def test_mnist_pairs_are_real_digits_with_matching_varied_captions(mnist_micro):
    data = mnist_micro
    assert len(data) == 5000 and data.images.shape == (5000, 3, 16, 16)
    assert data.class_names == list(DIGIT_NAMES)
    assert sorted(torch.bincount(data.labels).tolist())[0] >= 400  # every digit present
    for caption, label in zip(data.captions[::97], data.labels[::97].tolist()):
        assert DIGIT_NAMES[label] in caption or str(label) in caption, caption
    assert len(set(data.captions)) > 100  # templates x digits x styles, not one per class
    pixels = denormalize_images(data.images[:50])
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.2  # ink on black


def test_normalisation_round_trip():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(denormalize_images(normalize_images(x)), x)


def test_image_text_set_validation():
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="empty"):
        ImageTextSet(images=images, captions=["a cat", "  "])
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        ImageTextSet(images=images, captions=["a cat"])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        ImageTextSet(images=torch.zeros(2, 1, 8, 8), captions=["a", "b"])


def test_split_is_disjoint_and_seeded(mnist_micro):
    small = mnist_micro.subset(range(100))
    train, test = train_test_split(small, test_size=20, seed=3)
    assert len(train) == 80 and len(test) == 20
    again = train_test_split(small, test_size=20, seed=3)[1]
    assert torch.equal(test.images, again.images)
    keys = {tuple(x.flatten()[:64].tolist()) for x in train.images}
    assert not any(tuple(x.flatten()[:64].tolist()) in keys for x in test.images)


def _write_pngs(folder: Path, n: int) -> list[np.ndarray]:
    arrays = []
    rng = np.random.default_rng(0)
    for i in range(n):
        a = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"img{i}.png")
        arrays.append(a)
    return arrays


def test_csv_folder_loader_reads_images_and_captions(tmp_path):
    arrays = _write_pngs(tmp_path, 3)
    with (tmp_path / "pairs.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "title"])
        for i in range(3):
            writer.writerow([f"img{i}.png", f"random picture {i}"])
    data = CsvImageText(tmp_path / "pairs.csv", image_size=16)
    assert len(data) == 3
    image, caption = data[1]
    assert caption == "random picture 1"
    expected = normalize_images(torch.from_numpy(arrays[1]).permute(2, 0, 1)[None].float() / 255)[0]
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def test_csv_loader_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("path,caption\nx.png,hi\n")
    with pytest.raises(ValueError, match="image_key='filepath' is not a column"):
        CsvImageText(tmp_path / "bad.csv", image_size=16)
    (tmp_path / "empty.csv").write_text("filepath,title\nx.png,\n")
    with pytest.raises(ValueError, match="empty caption"):
        CsvImageText(tmp_path / "empty.csv", image_size=16)
    with pytest.raises(FileNotFoundError, match="csv_path"):
        CsvImageText(tmp_path / "missing.csv", image_size=16)


def test_webdataset_shards_round_trip(tmp_path, mnist_micro):
    pairs = mnist_micro.subset(range(10))
    shards = write_webdataset_shards(pairs, tmp_path, per_shard=4)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    items = list(WebDatasetShards(shards, image_size=16))
    assert [c for _, c in items] == pairs.captions
    # PNG stores 8-bit pixels: equal up to one quantisation step
    got = denormalize_images(torch.stack([x for x, _ in items]))
    torch.testing.assert_close(got, denormalize_images(pairs.images), atol=1 / 255 + 1e-6, rtol=0)


def test_webdataset_shards_split_across_ranks(tmp_path, mnist_micro, monkeypatch):
    shards = write_webdataset_shards(mnist_micro.subset(range(12)), tmp_path, per_shard=3)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        seen.append([c for _, c in WebDatasetShards(shards, image_size=16)])
    assert len(seen[0]) == len(seen[1]) == 6
    assert sorted(seen[0] + seen[1]) == sorted(mnist_micro.captions[:12])


def test_webdataset_skips_incomplete_samples_and_refuses_empty_captions(tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in (
            ("a.png", buf.getvalue()),
            ("a.txt", b"black"),
            ("b.json", b"{}"),
            ("c.png", buf.getvalue()),
            ("c.txt", b" "),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    reader = iter(WebDatasetShards([path], image_size=16))
    assert next(reader)[1] == "black"
    with pytest.raises(ValueError, match="empty caption"):
        next(reader)
    with pytest.raises(ValueError, match="shards is empty"):
        WebDatasetShards([], image_size=16)


def _font():
    dejavu = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    return str(dejavu) if dejavu.is_file() else ImageFont.load_default(size=90)


def test_emoji_path_renders_distinct_images_with_captions():
    """The emoji set's code path, with a plain font standing in for the colour-emoji one."""
    names = {"A": "letter a", "+": "plus sign", "O": "ring"}
    data = emoji_pairs(names=names, font=_font(), image_size=32)
    assert data.images.shape == (3, 3, 32, 32)
    assert "letter a" in data.captions[0] and "plus sign" in data.captions[1]
    flat = data.images.flatten(1)
    assert (torch.cdist(flat, flat) + torch.eye(3) * 1e9).min() > 1.0  # glyphs differ
    white = normalize_images(torch.ones(1, 3, 32, 32))
    assert all(not torch.allclose(img, white[0]) for img in data.images)  # something was drawn


def test_emoji_without_font_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr("verger.maeclip.data.find_emoji_font", lambda: None)
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        emoji_pairs(names={"A": "a"})


def test_collate_stacks_and_tokenizes(tokenizer_micro, mnist_micro):
    images, texts = ImageTextCollate(tokenizer_micro)([mnist_micro[0], mnist_micro[1]])
    assert images.shape == (2, 3, 16, 16) and texts.shape == (2, 16)
    assert tokenizer_micro.decode(texts[0].tolist()) == mnist_micro.captions[0]


def test_csv_loader_reports_short_rows_and_reads_a_byte_order_mark(tmp_path):
    _write_pngs(tmp_path, 2)
    # a row without its caption cell (DictReader fills it with None)
    (tmp_path / "short.csv").write_text("filepath,title\nimg0.png,a cat\nimg1.png\n")
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty caption"):
        CsvImageText(tmp_path / "short.csv", image_size=16)
    (tmp_path / "nopath.csv").write_text("filepath,title\nimg0.png,a cat\n,a dog\n")
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty image path"):
        CsvImageText(tmp_path / "nopath.csv", image_size=16)
    # spreadsheet exports put a BOM before the first column name
    (tmp_path / "bom.csv").write_text("\ufefffilepath,title\nimg1.png,noise\n", encoding="utf-8")
    data = CsvImageText(tmp_path / "bom.csv", image_size=16)
    assert data.captions == ["noise"] and data.paths == [tmp_path / "img1.png"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_webdataset_corrupt_shards_and_images_are_named(tmp_path):
    import io

    png = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(png, format="PNG")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match=r"garbage\.tar: corrupt or unreadable tar shard"):
        list(WebDatasetShards([garbage], image_size=16))
    good = _tar(tmp_path / "good.tar", [("a.png", png.getvalue()), ("a.txt", b"black")])
    torn = tmp_path / "torn.tar"
    torn.write_bytes(good.read_bytes()[:700])  # cut inside the first member's data
    with pytest.raises(ValueError, match=r"torn\.tar: corrupt or unreadable tar shard"):
        list(WebDatasetShards([torn], image_size=16))
    bad_image = _tar(
        tmp_path / "bad.tar",
        [("a.png", png.getvalue()), ("a.txt", b"ok"), ("b.png", b"not a png"), ("b.txt", b"x")],
    )
    reader = iter(WebDatasetShards([bad_image], image_size=16))
    assert next(reader)[1] == "ok"
    with pytest.raises(ValueError, match=r"bad\.tar: sample 'b' has an unreadable image"):
        next(reader)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_embedded_sets_refuse_a_bad_image_size(size):
    from verger.maeclip import mnist_pairs

    with pytest.raises(ValueError, match=rf"image_size={size!r} must be an int >= 1"):
        mnist_pairs(image_size=size)
    with pytest.raises(ValueError, match="image_size"):
        emoji_pairs(image_size=size, names={"A": "a"}, font=_font())


def test_image_text_set_refuses_integer_pixels():
    with pytest.raises(TypeError, match=r"images\.dtype=torch\.uint8"):
        ImageTextSet(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), captions=["a", "b"])


def test_csv_loader_names_undecodable_files_and_bad_images(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("filepath,title\nx.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv is not UTF-8 text"):
        CsvImageText(tmp_path / "latin1.csv", image_size=16)
    _write_pngs(tmp_path, 2)
    (tmp_path / "img1.png").write_bytes(b"not a png")
    (tmp_path / "pairs.csv").write_text("filepath,title\nimg0.png,a\nimg1.png,b\nimg9.png,c\n")
    data = CsvImageText(tmp_path / "pairs.csv", image_size=16)
    with pytest.raises(ValueError, match=r"2 of 3 images cannot be read: row 1 .*img1\.png"):
        data.check_images(show_progress=False)
    assert data[0][1] == "a"
    with pytest.raises(ValueError, match=r"row 2 image .*img9\.png.* cannot be read"):
        data[2]  # without the up-front check, the loader still names the row and file
