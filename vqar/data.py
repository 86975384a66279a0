"""Image sources and transforms. A source is one string, the same in recipes, `--data` and Python:

- `digits`: scikit-learn's 1,797 labelled 8x8 handwritten digits (bundled, offline);
- `photos`: scikit-image's sample colour photographs (bundled, offline), cropped at random;
- a folder of images, searched recursively; when every image sits in a first-level subfolder
  (and there are two or more), the subfolder names are the class labels, as torchvision's
  `ImageFolder` and `datasets`' imagefolder read them;
- a folder written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict and `split`);
- a parquet file, or a glob of them;
- `shapes`: 6,000 captioned 32 px images of coloured shapes (`vqar.shapes`, drawn offline);
- webdataset tar shards, a glob or a brace range (`shards/{000000..000099}.tar`): `KEY.jpg|png|webp`
  with `KEY.cls` (an integer label) or `KEY.json` (its `label`, `caption`/`text`/`prompt`), and
  `KEY.txt` (the caption), as 1d-tokenizer and the Infinity forks feed their training;
- anything else that does not look like a path is a Hugging Face Hub dataset id. A path that
  does not exist is an error naming it; the Hub is never asked about it.

The image column is the first `Image` feature (or `image`, `img`), the label column the first
`ClassLabel` feature (or `label`). Every source becomes a `datasets` dataset whose image column
is left undecoded, so that one corrupt file is skipped and counted by `ImageDataset` instead of
crashing a run in `datasets`' own decoder.
"""

from __future__ import annotations

import glob
import importlib
import io
import json
import logging
import numbers
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

logger = logging.getLogger(__name__)

PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "motorcycle",
)
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


SOURCE_HELP = "digits | photos | shapes | image folder | *.parquet | *.tar shards | saved dataset | Hub id"


class UnreadableImage(ValueError):
    """An image that Pillow cannot decode; names the file when it has one."""


# -- sources --------------------------------------------------------------------------------


def _bundled(module: str, source: str):
    """Import the package that ships a bundled source's images, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = {"sklearn.datasets": "scikit-learn", "skimage.data": "scikit-image"}[module]
        raise ImportError(
            f"the bundled '{source}' images ship inside {package}, which is not installed: pip install 'vqar[demo]'"
        ) from error


def _digits() -> datasets.Dataset:
    digits = _bundled("sklearn.datasets", "digits").load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features
    )


def _photo(name: str) -> np.ndarray:
    data = _bundled("skimage.data", "photos")
    return data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()


def _photos() -> datasets.Dataset:
    images = [Image.fromarray(_photo(name)).convert("RGB") for name in PHOTO_NAMES]
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "name": list(PHOTO_NAMES)}, features=features)


def _shapes() -> datasets.Dataset:
    from .shapes import shapes_dataset  # drawn on first use: 6,000 images in a few seconds

    return shapes_dataset()


BUNDLED_SOURCES = {"digits": _digits, "photos": _photos, "shapes": _shapes}


STREAM_SHARDS = 64  # a local source streams as this many shards: enough to divide among processes and workers
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # datasets' imagefolder convention
CAPTION_COLUMNS = ("text", "caption", "prompt")  # the first string column of these names holds captions


def _image_folder(root: Path) -> datasets.Dataset:
    """A folder as `datasets`' imagefolder reads it: with metadata files, their columns (labels,
    captions) joined to the images by `file_name`; without, labels from first-level subfolders."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...) found under {root}")
    metadata = sorted(p for p in root.rglob("*") if p.name in METADATA_FILES)
    if metadata:
        return _with_metadata(root, paths, metadata)
    classes = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    if len(classes) < 2 or any(len(p.relative_to(root).parts) == 1 for p in paths):
        return datasets.Dataset.from_dict({"image": [str(p) for p in paths]})
    labels = [classes.index(p.relative_to(root).parts[0]) for p in paths]
    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": [str(p) for p in paths], "label": labels}, features=features)


def _read_metadata(path: Path) -> list[dict]:
    """The rows of one metadata file (csv, jsonl or parquet), with types inferred as `datasets` does.
    Bytes that are not UTF-8 in a csv or jsonl file become U+FFFD, counted in a warning."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    readers = {".csv": pyarrow.csv.read_csv, ".jsonl": pyarrow.json.read_json, ".parquet": pyarrow.parquet.read_table}
    try:
        table = readers[path.suffix](str(path) if path.suffix == ".parquet" else _as_utf8(path))
    except Exception as error:  # a malformed file: say which
        raise ValueError(f"cannot read the metadata file {path}: {type(error).__name__}: {error}") from error
    if "file_name" not in table.column_names:
        raise ValueError(f"metadata file {path} has no `file_name` column (the image's path relative to it)")
    return table.to_pylist()


def _as_utf8(path: Path) -> io.BytesIO:
    """A text file's bytes as valid UTF-8, whatever it held."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if replaced:
        logger.warning("%s: %d byte sequence(s) that are not UTF-8 read as U+FFFD", path, replaced)
    return io.BytesIO(text.encode("utf-8"))


# -- webdataset tar shards ------------------------------------------------------------------

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _is_tar_source(source: str) -> bool:
    return source.endswith(".tar") or (source.endswith("}") and ".tar{" in source)


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar (zero padding kept); `{x,y}` lists too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers_range = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers_range:
        first, last = numbers_range.groups()
        choices = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def tar_shards(source: str) -> list[str]:
    """The shard files a tar source names (brace ranges and globs), sorted; an error when there are none."""
    files = sorted({f for pattern in expand_braces(source) for f in glob.glob(os.path.expanduser(pattern))})
    if not files:
        raise FileNotFoundError(f"no tar shards match {source!r} (braces such as {{000..099}} and globs are expanded)")
    return files


def _tar_examples(shards: list[str], stamps: list[str] | None = None):
    """Examples {"image": {"bytes", "path"}, "label", "caption"} of webdataset shards, in order: the
    files of one example are consecutive members sharing the key (the name up to its first dot).
    `stamps` (each shard's size and time) is unused here: it makes `datasets`' cache key follow the
    shards' content, so that a rewritten shard is read again."""
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                key, parts = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, _, extension = name.partition(".")
                    if (folder, stem) != key and parts:
                        yield _tar_example(shard, key, parts)
                        parts = {}
                    key = (folder, stem)
                    parts[extension.lower()] = tar.extractfile(member).read()
                if parts:
                    yield _tar_example(shard, key, parts)
        except tarfile.TarError as error:
            raise ValueError(f"{shard} is not a readable tar shard: {error}") from error


def _tar_example(shard: str, key: tuple[str, str], parts: dict[str, bytes]) -> dict:
    name = "/".join(filter(None, key))
    extension = next((e for e in TAR_IMAGE_EXTENSIONS if e in parts), None)
    meta = _json_part(parts.get("json"), shard, name)
    label = parts["cls"].decode("utf-8", errors="replace").strip() if "cls" in parts else meta.get("label")
    caption = parts.get("txt")
    caption = caption.decode("utf-8", errors="replace") if caption is not None else None
    caption = caption or next((meta[c] for c in CAPTION_COLUMNS if isinstance(meta.get(c), str)), None)
    return {
        "image": {"bytes": parts.get(extension), "path": f"{shard}:{name}.{extension or '(no image file)'}"},
        "label": int(label) if isinstance(label, int) or (isinstance(label, str) and label.isdigit()) else -1,
        "caption": caption,
    }


def _json_part(raw: bytes | None, shard: str, name: str) -> dict:
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        logger.warning("%s: %s.json is not JSON; its label and caption are ignored", shard, name)
        return {}
    return value if isinstance(value, dict) else {}


def _webdataset(source: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """Tar shards as a dataset (written to `datasets`' cache once) or a stream with one shard per file;
    the label and caption columns are kept only when the first example has them."""
    shards = tar_shards(source)
    examples = _tar_examples(shards[:1])
    first = next(examples, None)
    examples.close()  # the shard's file with it
    if first is None:
        raise ValueError(f"the tar shard {shards[0]} holds no files")
    if first["image"]["bytes"] is None:
        raise ValueError(
            f"the first example of {shards[0]} has no image (expected KEY.{'|'.join(TAR_IMAGE_EXTENSIONS)})"
        )
    features = {
        "image": datasets.Image(decode=False),
        "label": datasets.Value("int64"),
        "caption": datasets.Value("string"),
    }
    build = datasets.IterableDataset.from_generator if streaming else datasets.Dataset.from_generator
    stamps = [f"{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in shards]
    dataset = build(
        _tar_examples, gen_kwargs={"shards": shards, "stamps": stamps}, features=datasets.Features(features)
    )
    dropped = [c for c, present in (("label", first["label"] >= 0), ("caption", first["caption"])) if not present]
    dataset = dataset.remove_columns(dropped) if dropped else dataset
    if "label" in dataset.column_names and isinstance(dataset, datasets.Dataset):  # class ids as classes, as digits has
        names = [str(i) for i in range(max(dataset["label"]) + 1)]
        dataset = dataset.cast_column("label", datasets.ClassLabel(names=names))
    return dataset


def _with_metadata(root: Path, paths: list[Path], metadata: list[Path]) -> datasets.Dataset:
    """Images joined to their metadata rows; images no row names are left out (and counted)."""
    rows = {}
    for file in metadata:
        for row in _read_metadata(file):
            rows[(file.parent / str(row.pop("file_name"))).resolve()] = row
    listed = [p for p in paths if p.resolve() in rows]
    if not listed:
        raise ValueError(
            f"no image under {root} is named in its metadata file(s) {[str(m) for m in metadata]}: "
            "`file_name` holds each image's path relative to the metadata file"
        )
    columns = sorted({key for row in rows.values() for key in row})
    table = {"image": [str(p) for p in listed]}
    table |= {c: [rows[p.resolve()].get(c) for p in listed] for c in columns if c not in ("image",)}
    if len(listed) < len(paths):
        logger.warning(
            "%d image file(s) under %s are not named in its metadata file(s): skipped", len(paths) - len(listed), root
        )
    label = table.get("label")
    if label is not None and all(isinstance(v, str) for v in label):  # names, as datasets keeps them: classes
        names = sorted(set(label))
        index = {name: i for i, name in enumerate(names)}
        table["label"] = [index[v] for v in label]
        return datasets.Dataset.from_dict(table, features=_features(table, datasets.ClassLabel(names=names)))
    if label is not None and all(isinstance(v, numbers.Integral) and v >= 0 for v in label):
        names = [str(i) for i in range(max(label) + 1)]
        return datasets.Dataset.from_dict(table, features=_features(table, datasets.ClassLabel(names=names)))
    return datasets.Dataset.from_dict(table)


def _features(table: dict, label: datasets.ClassLabel) -> datasets.Features:
    inferred = datasets.Dataset.from_dict({k: v[:1] for k, v in table.items() if k != "label"}).features
    return datasets.Features({**inferred, "label": label})


def _saved_dataset(root: Path, split: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"the saved dataset {root} has no split {split!r}; its splits: {sorted(loaded)}")
        return loaded[split]
    return loaded


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (
        (root / "dataset_info.json").is_file() and (root / "state.json").is_file()
    )


def _looks_like_a_path(source: str) -> bool:
    """A source that can only mean a local file or folder (a Hub id is `name` or `owner/name`)."""
    head = source.split("/")[0]
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in IMAGE_EXTENSIONS | {".parquet", ".arrow", ".json", ".csv"}
        or ("/" in source and os.path.isdir(head))
    )


def _hub_dataset(source: str, split: str, streaming: bool):
    try:
        return datasets.load_dataset(source, split=split, streaming=streaming)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:  # offline, unknown id, no such split
        reason = " ".join(str(error).split())[:300]
        raise ValueError(
            f"data source {source!r} is not a local folder or file ({Path(source).resolve()} does not exist), nor a "
            f"dataset the Hub gave: {type(error).__name__}: {reason}"
        ) from error


def load_source(
    source: str,
    *,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    streaming: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Resolve a source string to a dataset with an `image` column (undecoded) and, if the
    source has them, a `label` column (class labels) and a `caption` column (strings)."""
    source = str(source)
    if source in BUNDLED_SOURCES:
        dataset = BUNDLED_SOURCES[source]()
    elif os.path.isdir(source):
        root = Path(source)
        dataset = _saved_dataset(root, split) if _is_saved_dataset(root) else _image_folder(root)
    elif _is_tar_source(source):
        dataset = _webdataset(source, streaming)
    elif source.endswith(".parquet"):
        files = sorted(glob.glob(source))
        if not files:
            raise FileNotFoundError(f"no parquet files match {source!r}")
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    elif os.path.exists(source):
        raise ValueError(f"data source {source!r} is a file; expected a folder of images or a .parquet file")
    elif _looks_like_a_path(source):
        raise FileNotFoundError(
            f"data source {source!r} does not exist (no file or folder at {Path(source).resolve()})"
        )
    else:
        dataset = _hub_dataset(source, split, streaming)
    dataset = _standardise_columns(dataset, source, image_column, label_column, caption_column)
    if streaming and isinstance(dataset, datasets.Dataset):  # folders, saved datasets, bundled sets stream too
        dataset = dataset.to_iterable_dataset(num_shards=min(len(dataset), STREAM_SHARDS))
    return dataset


def _standardise_columns(
    dataset, source: str, image_column: str | None, label_column: str | None, caption_column: str | None = None
):
    features = dataset.features or {}
    columns = list(features) or list(dataset.column_names or [])
    image_column = image_column or next(
        (c for c in columns if isinstance(features.get(c), datasets.Image)),
        next((c for c in ("image", "img") if c in columns), None),
    )
    if image_column not in columns:
        raise ValueError(f"data source {source!r} has no image column {image_column!r}; columns: {columns}")
    if label_column is not None and label_column not in columns:
        raise ValueError(f"data source {source!r} has no label column {label_column!r}; columns: {columns}")
    label_column = label_column or next(
        (c for c in columns if isinstance(features.get(c), datasets.ClassLabel)),
        "label" if "label" in columns else None,
    )
    if caption_column is not None and caption_column not in columns:
        raise ValueError(f"data source {source!r} has no caption column {caption_column!r}; columns: {columns}")
    caption_column = caption_column or next((c for c in CAPTION_COLUMNS if _is_string(features.get(c))), None)
    keep = {image_column: "image", **({label_column: "label"} if label_column else {})}
    keep |= {caption_column: "caption"} if caption_column else {}
    dataset = dataset.select_columns(list(keep))
    dataset = dataset.rename_columns({k: v for k, v in keep.items() if k != v})
    if isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if label_column and _is_string(features.get(label_column)) and isinstance(dataset, datasets.Dataset):
        dataset = dataset.class_encode_column("label")  # label names as classes, sorted
    return dataset


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def class_names(dataset) -> list[str] | None:
    """Names of the label classes when the source has a ClassLabel column."""
    feature = (dataset.features or {}).get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def describe_source(dataset, name: str) -> str:
    """One line saying what a source holds: images, classes (names and counts), captions.

    Read at the start of every command that reads images, so that labels a user expected and the
    source did not give (or gave under another column) are seen before the run, not after it."""
    if not isinstance(dataset, datasets.Dataset):
        columns = ", ".join(c for c in ("label", "caption") if c in (dataset.column_names or []))
        return f"{name}: a stream of images (its length is read as it goes){'; with ' + columns if columns else ''}"
    line = f"{name}: {len(dataset):,} images"
    names = class_names(dataset)
    if names:
        counts = np.bincount(np.asarray(dataset["label"], dtype=np.int64).clip(0), minlength=len(names))
        shown = ", ".join(f"{n}: {c:,}" for n, c in zip(names[:12], counts[:12]))
        line += f", {len(names)} classes ({shown}{', ...' if len(names) > 12 else ''})"
    elif "caption" not in dataset.column_names:
        line += ", no class labels (a `label` column, class subfolders or metadata labels give them)"
    if "caption" in dataset.column_names:
        captions = sum(bool(c and str(c).strip()) for c in dataset["caption"])
        line += f", {captions:,} captions"
    return line


def split_holdout(dataset: datasets.Dataset, eval_fraction: float, seed: int = 0):
    """Deterministic (train, eval) split; the same seed always holds out the same examples."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    n_eval = max(1, round(len(dataset) * eval_fraction))
    if n_eval >= len(dataset):
        raise ValueError(f"a data set of {len(dataset)} images is too small to hold out {n_eval} for evaluation")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return dataset.select(np.sort(order[n_eval:])), dataset.select(np.sort(order[:n_eval]))


# -- decoding and transforms ----------------------------------------------------------------


def decode_image(value) -> Image.Image:
    """A PIL image from what a dataset holds: a PIL image, a path, bytes, or {'bytes', 'path'}."""
    if isinstance(value, Image.Image):
        return value
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    try:
        with warnings.catch_warnings():
            # Above Image.MAX_IMAGE_PIXELS Pillow only warns, then decodes: refuse it before it allocates.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if data else path)
            image.load()
    except Exception as error:  # Pillow raises many types for bad files
        raise UnreadableImage(f"cannot read image {path or '<bytes>'}: {error}") from error
    return image


def read_image(value) -> Image.Image:
    """`decode_image` then `to_rgb`: an RGB PIL image, or UnreadableImage naming the file."""
    image = decode_image(value)
    try:
        return to_rgb(image)
    except Exception as error:  # a mode or EXIF block Pillow cannot convert
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        raise UnreadableImage(f"cannot convert image {path or '<bytes>'} ({image.mode}) to RGB: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (1, L, LA, P, RGBA, I;16, I, F, CMYK, ...) -> RGB, turned upright by its EXIF
    orientation; transparency onto white. An image that is RGB already and has no EXIF comes back as it is."""
    if _may_be_rotated(image):
        image = ImageOps.exif_transpose(image)
    elif image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP", "HEIF", "AVIF")  # where an orientation tag may hide outside info["exif"]


def _may_be_rotated(image: Image.Image) -> bool:
    """Whether an EXIF orientation could apply: reading the EXIF of every small PNG costs more than decoding it."""
    return "exif" in image.info or image.format in EXIF_FORMATS or image.format is None


@dataclass
class ImageTransform:
    """PIL image -> [3, R, R] float tensor in [-1, 1].

    The shorter side is resized to `resize_to` (default: `resolution`), then a `resolution`
    square is cropped (centre, or random) and optionally flipped, and a share `random_channels` of
    the crops gets one of the six orders of its colour channels. Random choices come from the generator
    passed in, so a (seed, epoch, index) always gives the same crop.
    """

    resolution: int
    resize_to: int | None = None
    random_crop: bool = False
    random_flip: bool = False
    random_channels: float = 0.0  # share of crops (0 to 1; true = 1) whose channels get a random order

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        self.random_channels = float(self.random_channels)
        if not 0 <= self.random_channels <= 1:
            raise ValueError(f"random_channels is a share of crops in [0, 1], got {self.random_channels}")
        if self.resize_to is not None and self.resize_to < self.resolution:
            raise ValueError(
                f"resize_to ({self.resize_to}) must be >= resolution ({self.resolution}): the shorter side is "
                "resized to it before a resolution-sized square is cropped"
            )

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.augment(self.prepare(image), generator)

    def prepare(self, image: Image.Image) -> Image.Image:
        """The deterministic part: RGB, shorter side resized to `resize_to`."""
        image = to_rgb(image)
        short = self.resize_to or self.resolution
        w, h = image.size
        scale = short / min(w, h)
        size = (max(short, round(w * scale)), max(short, round(h * scale)))
        return image.resize(size, Image.BICUBIC, reducing_gap=3.0)

    def augment(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """The random part: crop and flip a prepared image -> [3, R, R] in [-1, 1]."""
        return to_unit_range(self.augment_uint8(image, generator))

    def augment_uint8(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """`augment` before the conversion to floats: [3, R, R] uint8, what datasets hand to a DataLoader
        (a batch is converted at once in `collate_images`, and a quarter of the bytes cross from workers)."""
        left, top = self._crop_origin(image.size, generator)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.resolution, self.resolution, 3).permute(2, 0, 1)
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            pixels = pixels.flip(-1)
        if self.random_channels and torch.rand((), generator=generator) < self.random_channels:
            pixels = pixels[torch.randperm(3, generator=generator)]
        return pixels

    def _crop_origin(self, size: tuple[int, int], generator: torch.Generator | None) -> tuple[int, int]:
        w, h = size
        if not self.random_crop:
            return (w - self.resolution) // 2, (h - self.resolution) // 2
        left = int(torch.randint(0, w - self.resolution + 1, (), generator=generator))
        top = int(torch.randint(0, h - self.resolution + 1, (), generator=generator))
        return left, top


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1] (x / 127.5 - 1); floats are taken to be there already."""
    return pixels.float().div_(127.5).sub_(1) if pixels.dtype == torch.uint8 else pixels


@dataclass(frozen=True)
class Unreadable:
    """What a dataset gives in place of an image it cannot read: which one, and why."""

    key: int | str  # the row of a map-style dataset; the file (or position) of a stream
    reason: str


class ImageDataset(torch.utils.data.Dataset):
    """A map-style view of a source for a DataLoader: decoded, transformed; an `Unreadable` in
    place of an image that cannot be read (the consumer counts and reports it, once per row).

    `repeats` lists every example several times per epoch (with different random crops), so a
    handful of photographs still fills batches. `set_epoch` changes the crops of the next epoch.
    Sources of at most `PREPARED_CACHE_LIMIT` images keep their decoded, resized images in
    memory: the bundled photos are megapixel PNGs, far slower to decode than to train on.
    """

    PREPARED_CACHE_LIMIT = 1024
    PROBE_LIMIT = 1000  # `require_readable` gives up after this many unreadable images

    def __init__(self, dataset: datasets.Dataset, transform: ImageTransform, *, repeats: int = 1, seed: int = 0):
        self.dataset, self.transform, self.repeats, self.seed = dataset, transform, repeats, seed
        self.has_labels = "label" in dataset.column_names
        self.epoch = 0
        self._prepared: dict[int, tuple] | None = {} if len(dataset) <= self.PREPARED_CACHE_LIMIT else None

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _prepare(self, row_index: int, row: dict | None = None) -> tuple[Image.Image, int] | Unreadable:
        if self._prepared is not None and row_index in self._prepared:
            return self._prepared[row_index]
        row = row if row is not None else self.dataset[row_index]
        try:
            prepared = self.transform.prepare(read_image(row["image"])), row["label"] if self.has_labels else -1
        except UnreadableImage as error:
            prepared = Unreadable(row_index, str(error))  # kept: a broken file is read (and reported) once
        if self._prepared is not None:
            self._prepared[row_index] = prepared
        return prepared

    def _example(self, index: int, prepared) -> dict | Unreadable:
        if isinstance(prepared, Unreadable):
            return prepared
        image, label = prepared
        pixels = self.transform.augment_uint8(image, _generator(self.seed, self.epoch, index))
        return {"pixels": pixels, "label": label, "index": index}

    def __getitem__(self, index: int) -> dict | Unreadable:
        return self._example(index, self._prepare(index % len(self.dataset)))

    def __getitems__(self, indices: list[int]) -> list[dict | Unreadable]:
        """A batch's examples, their rows read from the source in one call (what a DataLoader asks for)."""
        rows = [i % len(self.dataset) for i in indices]
        missing = [r for r in rows if self._prepared is None or r not in self._prepared]
        fetched = {}
        if missing:
            columns = self.dataset[missing]  # one Arrow read for the batch, not one per image
            fetched = {r: {name: values[j] for name, values in columns.items()} for j, r in enumerate(missing)}
        return [self._example(i, self._prepare(r, fetched.get(r))) for i, r in zip(indices, rows)]

    def caption(self, index: int) -> str:
        """The caption of example `index` ("" when the source has none for it)."""
        if "caption" not in self.dataset.column_names:
            return ""
        return self.dataset[index % len(self.dataset)]["caption"] or ""

    def require_readable(self, name: str) -> tuple[int, int]:
        """Raise unless some image of the source can be read: a folder of broken files is an error
        at start-up, not a run that waits forever for a batch. Reads until the first good image and
        returns its size (width, height) as stored."""
        problems = []
        for row_index in range(min(len(self.dataset), self.PROBE_LIMIT)):
            prepared = self._prepare(row_index)
            if not isinstance(prepared, Unreadable):
                return read_image(self.dataset[row_index]["image"]).size
            problems.append(prepared.reason)
        tried = f"all {len(problems)}" if len(problems) == len(self.dataset) else f"the first {len(problems)}"
        raise ValueError(f"no image of {name} can be read ({tried} images tried); the first: {problems[0]}")


def _generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # Tuples of ints hash the same in every process (PYTHONHASHSEED only salts str and bytes).
    return torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF)


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """An iterable view of a streaming source, shuffled through a buffer; an `Unreadable` in place
    of a bad image (keyed by its file when the stream has one, else by its position).

    With several processes each reads its own part of the stream (`split_dataset_by_node`: whole
    shards when their number divides among the processes, else every n-th example); with several
    DataLoader workers each reads its own shards. `skip_batches` makes the next pass start after
    the batches a resumed run had trained on, reading those rows without decoding their images.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        transform: ImageTransform,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else dataset
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.batches_to_skip, self.batch_size = 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """The next pass leaves out the first `batches` batches of `batch_size` (as a DataLoader makes them)."""
        self.batches_to_skip, self.batch_size = batches, batch_size

    def _rows_to_skip(self) -> int:
        """Rows of this worker's stream in the batches to skip: the DataLoader takes batch b from worker b % W."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return max(0, -(-(self.batches_to_skip - worker) // workers)) * self.batch_size

    def __iter__(self):
        skip = self._rows_to_skip()
        for index, row in enumerate(self.dataset):
            if index < skip:
                continue  # trained on before the resume: read, not decoded
            try:
                image = self.transform.prepare(read_image(row["image"]))
            except UnreadableImage as error:
                value = row["image"]
                yield Unreadable((value.get("path") if isinstance(value, dict) else None) or f"#{index}", str(error))
                continue
            pixels = self.transform.augment_uint8(image, _generator(self.seed, self.epoch, index))
            yield {"pixels": pixels, "label": row.get("label", -1), "index": index}
        self.batches_to_skip = 0


def split_stream(dataset: datasets.IterableDataset, eval_size: int):
    """(train stream, held-out Dataset): the first `eval_size` examples are held out."""
    held_out = list(dataset.take(eval_size))
    if not held_out:
        raise ValueError("the streaming source yielded no examples to hold out")
    return dataset.skip(eval_size), datasets.Dataset.from_list(held_out, features=dataset.features)


def collate_images(batch: list[dict | Unreadable]) -> dict:
    """Stack the readable examples of a batch and list the unreadable ones.

    Returns pixels [B, 3, R, R] (floats in [-1, 1]), labels [B] (-1 without labels), indices [B] (positions in
    the dataset), unreadable (the `Unreadable`s) and skipped (how many there were).
    """
    good = [example for example in batch if not isinstance(example, Unreadable)]
    unreadable = [example for example in batch if isinstance(example, Unreadable)]
    pixels = to_unit_range(torch.stack([e["pixels"] for e in good])) if good else torch.empty(0, 3, 0, 0)
    labels = torch.tensor([e["label"] for e in good], dtype=torch.long)
    indices = torch.tensor([e["index"] for e in good], dtype=torch.long)
    return {
        "pixels": pixels,
        "labels": labels,
        "indices": indices,
        "unreadable": unreadable,
        "skipped": len(unreadable),
    }


def report_unreadable(batch: dict, seen: set) -> None:
    """Warn once for each unreadable image of a batch not already in `seen` (which it joins)."""
    for bad in batch["unreadable"]:
        if bad.key not in seen:
            seen.add(bad.key)
            logger.warning("skipping an unreadable image (reported once): %s", bad.reason)


# -- writing images -------------------------------------------------------------------------


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> B RGB PIL images."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


def image_grid(rows: list[torch.Tensor], padding: int = 2, labels: list[str] | None = None) -> Image.Image:
    """One PIL image of several rows of images, each row [N, 3, H, W] in [-1, 1], on white;
    `labels` writes one name left of each row."""
    n = max(len(row) for row in rows)
    H, W = rows[0].shape[-2:]
    font = ImageFont.load_default()
    margin = max((round(font.getlength(str(label))) for label in labels), default=0) + 2 * padding if labels else 0
    grid = Image.new("RGB", (margin + n * (W + padding) + padding, len(rows) * (H + padding) + padding), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = padding + r * (H + padding)
        if labels:
            draw.text((padding, top + H // 2), str(labels[r]), fill="black", font=font, anchor="lm")
        for c, image in enumerate(to_pil(row)):
            grid.paste(image, (margin + padding + c * (W + padding), top))
    return grid


def save_images(
    images: torch.Tensor,
    output: str | Path,
    rows: int = 1,
    labels: list[str] | None = None,
    first: torch.Tensor | None = None,
    mark_row: int | None = None,
) -> list[str]:
    """Write images [B, 3, H, W] in [-1, 1] as PNGs, and `grid.png` with `rows` rows: named by
    `labels`, each starting with the image `first` [1, 3, H, W] when given, and with a red line
    along pixel row `mark_row` (where a completion's kept prefix ends). Returns the PNGs' paths."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"{i:04d}.png"))
        image_grid([image[None]], padding=0).save(paths[-1])
    per_row = -(-len(images) // rows)
    grid_rows = [row if first is None else torch.cat([first.to(row), row]) for row in images.split(per_row)]
    if mark_row is not None:
        grid_rows = [_mark_row(row, mark_row) for row in grid_rows]
    image_grid(grid_rows, labels=labels).save(folder / "grid.png")
    return paths


def _mark_row(images: torch.Tensor, y: int) -> torch.Tensor:
    """Images [B, 3, H, W] with a red line along pixel row y."""
    marked = images.clone()
    marked[:, :, max(0, y - 1) : y + 1] = torch.tensor([1.0, -1.0, -1.0], device=images.device)[:, None, None]
    return marked


# -- loaders ---------------------------------------------------------------------------------


def share(length: int, rank: int, world_size: int) -> range:
    """The contiguous rows of `length` that process `rank` of `world_size` takes: in rank order, the
    shares are the whole, and they differ in size by one at most."""
    return range(length * rank // world_size, length * (rank + 1) // world_size)


def make_loader(
    dataset, batch_size: int, *, collate_fn, sampler=None, drop_last: bool = False, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader that never draws from the global RNG.

    Each new DataLoader iterator draws a seed from its generator, by default the global one. A
    resumed run creates its iterator after restoring the RNG states, an uninterrupted one before
    saving them, so that draw would shift every random number after a resume. Data randomness
    here comes from (seed, epoch, index) alone, so a private generator changes nothing else.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
