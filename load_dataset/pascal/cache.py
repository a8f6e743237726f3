"""On-disk caches of a PASCAL split: the label table, and the resized images and masks.

Files in `cache_dir`, for split `setname` at image size S (STEM = pascal_<setname>_<S>px_<FP>):

| file                                 | what it holds                                          |
| ------------------------------------ | ------------------------------------------------------ |
| STEM.images.npy                      | uint8 [N, S, S, 3]: image n resized, RGB, HWC          |
| STEM.masks.npy                       | uint8 [N, S, S]: mask n resized (nearest), 0..20, 255  |
| STEM.json                            | format, fingerprint, ids, shapes, CRC-32 of every row  |
| STEM.lock                            | empty; serialises builders (several torchrun ranks)    |
| pascal_<setname>_labels_<FPM>.npz    | the label table: ids and uint8 [N, 20] multi-hot       |

Rows are in the dataset's (sorted) order; both .npy files are opened with
`np.load(..., mmap_mode="r")`, so an epoch reads each image as a 307 KB slice of a memory
map (S = 320) instead of decoding a JPEG. The rows are what the dataset's uncached path
produces before augmentation, made by the same function, so a cached sample equals an
uncached one.

Fingerprints. FP hashes the format version, setname, S, the torchvision and Pillow versions
(resize and JPEG decoder define the bytes) and, per image, its id and the name, size and
modification time of its image and mask files. FPM hashes the ids and the image and mask files
only (the labels depend neither on S nor on the decoders; the images count because the table
is computed only after every mask has been checked to have its image's size). A changed,
added or removed file changes the name, so a stale cache is never opened: the next
construction builds a new one. Old files stay until deleted (the cache holds derived data
only; delete it at any time).

Never silently wrong. A build writes each file to a temporary name, fsyncs it and renames it
into place (`os.replace`); the JSON is renamed last and marks the build complete, so a killed
build leaves no files that look valid. On opening, the JSON must match the fingerprint and
ids, each .npy header must give the expected dtype and shape, each file must have exactly
the expected size (a truncated file fails here), and the CRC-32 of a few rows spread over
the files must match the JSON. A cache that fails any check is rebuilt, with one warning
sentence that names the file and the reason. Builders take an exclusive `flock` on
STEM.lock, so when several ranks start at once one builds and the others wait, then open
what it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision

from load_dataset.errors import DataError
from load_dataset.pascal.labels import N_CLASSES
from load_dataset.pascal.layout import Entry
from load_dataset.utils import atomic_file

# 2: images and masks turned by their EXIF orientation (load_dataset.images); a cache of 1 is
# rebuilt, since an oriented photo's pixels changed.
FORMAT_VERSION = 2
N_CHECKED_ROWS = 8  # rows whose CRC is checked on every open: cheap (~1 ms), catches junk files

# What the builder gets for image n: image uint8 [3, S, S], mask uint8 [S, S] (both resized)
# and the label float32 [20] of the full-resolution mask.
Decoded = tuple[torch.Tensor, torch.Tensor, np.ndarray]


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CacheWarning(UserWarning):
    """A cache file was unusable (truncated, damaged, foreign) and is being rebuilt."""


# ------------------------------------------------------------------ label table (.npz)


def label_table_path(cache_dir: str | os.PathLike, setname: str, entries: list[Entry]) -> Path:
    """Where the label table of these entries lies: the name holds a hash of the image and mask
    files (the images count because computing the table checks each mask against its image's
    size: a table found again means that check passed for these files)."""
    h = hashlib.sha256()
    for e in entries:
        h.update(e.image_id.encode())
        for path in (e.image_path, e.mask_path):
            st = os.stat(path)
            h.update(f"\t{os.path.basename(path)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        h.update(b"\n")
    return Path(cache_dir) / f"pascal_{setname}_labels_{h.hexdigest()[:20]}.npz"


def read_label_table(path: Path, image_ids: Sequence[str]) -> np.ndarray | None:
    """float32 [N, 20] from `path`, or None when it is absent, unreadable or for other ids."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, labels = data["image_ids"].tolist(), data["labels"].astype(np.float32)
    except (OSError, ValueError, KeyError, EOFError, zlib.error):
        return None  # unreadable: the caller recomputes and rewrites it
    if ids != list(image_ids) or labels.shape != (len(image_ids), N_CLASSES):
        return None
    return labels


def write_label_table(path: Path, image_ids: Sequence[str], labels: np.ndarray) -> None:
    """Writes ids and labels (float32 [N, 20] of 0/1, stored as uint8) atomically to `path`."""
    with atomic_file(path) as f:
        np.savez(f, image_ids=np.array(list(image_ids)), labels=labels.astype(np.uint8))


# ------------------------------------------------------------------ image + mask cache


def split_fingerprint(entries: list[Entry], setname: str, image_size: int) -> str:
    """20 hex digits that change with any id, file (name, size, mtime), S or decoder version."""
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION}\t{setname}\t{image_size}\t".encode())
    h.update(f"torchvision {torchvision.__version__}\tPillow {PIL.__version__}\n".encode())
    for e in entries:
        parts = [e.image_id, e.source]
        for path in (e.image_path, e.mask_path):
            st = os.stat(path)
            parts += [os.path.basename(path), str(st.st_size), str(st.st_mtime_ns)]
        h.update(("\t".join(parts) + "\n").encode())
    return h.hexdigest()[:20]


class ImageCache:
    """The resized uint8 images and masks of one split, memory-mapped from STEM.*.npy.

    Pickles without its memory maps (a DataLoader worker started by spawn/forkserver
    reopens them on first use instead of receiving a copy of the whole array).
    """

    def __init__(self, stem: Path, n_images: int, image_size: int) -> None:
        self.stem = stem
        self.n_images = n_images
        self.image_size = image_size
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    @property
    def images_path(self) -> Path:
        return _with_suffix(self.stem, ".images.npy")

    @property
    def masks_path(self) -> Path:
        return _with_suffix(self.stem, ".masks.npy")

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data on disk: N * (3 * S * S + S * S)."""
        return self.n_images * 4 * self.image_size**2

    def sample(self, i: int, with_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image i as uint8 [3, S, S] (channels-last strides) and, if asked, its mask [S, S]."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
            self._masks = np.load(self.masks_path, mmap_mode="r")
        # np.array copies the slice out of the read-only map (~0.02 ms): torch wants
        # writable memory, and augmentations may work in place.
        image = torch.from_numpy(np.array(self._images[i])).permute(2, 0, 1)
        mask = torch.from_numpy(np.array(self._masks[i])) if with_mask else None
        return image, mask

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_masks": None}


def open_or_build(
    cache_dir: str | os.PathLike,
    setname: str,
    entries: list[Entry],
    image_size: int,
    decode: Callable[[int], Decoded],
    workers: int | None = None,
) -> tuple[ImageCache, np.ndarray | None]:
    """The split's image cache, built first when absent, stale or damaged.

    `decode(n)` gives entry n resized (see `Decoded`); it is called from `workers` threads
    (default: the usable cores, at most 8) while building. Returns the cache and, when it
    was built now, the label table float32 [N, 20] gathered on the way (else None: read the
    .npz, which is cheaper than touching every mask).
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cache_dir {cache_dir} cannot be created ({e}); choose another.") from None
    fp = split_fingerprint(entries, setname, image_size)
    stem = cache_dir / f"pascal_{setname}_{image_size}px_{fp}"
    ids = [e.image_id for e in entries]
    cache = ImageCache(stem, len(entries), image_size)
    if _problem(cache, fp, ids) is None:
        return cache, None
    with _exclusive(_with_suffix(stem, ".lock")) as locked:
        problem = _problem(cache, fp, ids)  # another rank may have built it while we waited
        if problem is None:
            return cache, None
        if problem != "absent":
            warnings.warn(
                f"The PASCAL cache {stem.name}.* in {cache_dir} is unusable ({problem}); "
                "rebuilding it.",
                CacheWarning,
                stacklevel=3,
            )
        if locked:  # nobody else is building this stem: leftovers of killed builds can go
            for leftover in cache_dir.glob(f".{stem.name}.*.tmp"):
                leftover.unlink(missing_ok=True)
        try:
            labels = _build(cache, fp, ids, setname, decode, workers)
        except OSError as e:  # decoders raise DataError: an OSError here is the cache's
            raise DataError(
                f"The PASCAL cache cannot be written to {cache_dir} ({e}); make the folder "
                "writable, free some space or set another cache_dir."
            ) from None
    problem = _problem(cache, fp, ids)
    if problem is not None:  # e.g. a file system that does not keep what was written
        raise DataError(
            f"The PASCAL cache {stem.name}.* in {cache_dir} fails its check right after "
            f"being written ({problem}); put cache_dir on a local disk."
        )
    return cache, labels


def _with_suffix(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def _problem(cache: ImageCache, fp: str, ids: list[str]) -> str | None:
    """None when the cache is complete and matches; else why not ('absent' when not built)."""
    meta_path = _with_suffix(cache.stem, ".json")
    if not meta_path.is_file():
        return "absent"
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            return "its JSON file is not an object"
    except (OSError, ValueError) as e:
        return f"its JSON file cannot be read: {e}"
    if meta.get("format") != FORMAT_VERSION or meta.get("fingerprint") != fp:
        return "its JSON file belongs to another format or fingerprint"
    if meta.get("image_ids") != ids:
        return "its JSON file lists other image ids"
    s = cache.image_size
    for path, shape, crc_key in (
        (cache.images_path, (len(ids), s, s, 3), "image_crc32"),
        (cache.masks_path, (len(ids), s, s), "mask_crc32"),
    ):
        problem = _array_problem(path, shape, meta.get(crc_key))
        if problem is not None:
            return f"{path.name}: {problem}"
    return None


def _array_problem(path: Path, shape: tuple[int, ...], crcs: object) -> str | None:
    if not isinstance(crcs, list) or len(crcs) != shape[0]:
        return "the JSON file holds no CRC for each row"
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return "the file is missing"
    except (OSError, ValueError, EOFError) as e:  # bad header, or shorter than its header says
        return f"the file is truncated or not a .npy array ({e})"
    if array.dtype != np.uint8 or array.shape != shape:
        return f"holds {array.dtype} {array.shape}, expected uint8 {shape}"
    expected = array.offset + array.nbytes
    size = path.stat().st_size
    if size != expected:
        return f"the file has {size} bytes, expected {expected}"
    n = shape[0]
    rows = np.unique(np.linspace(0, n - 1, N_CHECKED_ROWS).round().astype(int)) if n else []
    for i in rows:
        if zlib.crc32(array[i].tobytes()) != crcs[i]:
            return f"row {i} does not match its CRC (the file was altered or damaged)"
    return None


def _build(
    cache: ImageCache,
    fp: str,
    ids: list[str],
    setname: str,
    decode: Callable[[int], Decoded],
    workers: int | None,
) -> np.ndarray:
    """Decodes every image once, writes STEM.images/.masks.npy and STEM.json; returns labels."""
    from tqdm import tqdm

    n, s = len(ids), cache.image_size
    _check_free_space(cache.stem.parent, cache.nbytes)
    if workers is None:
        workers = min(8, usable_cores())
    labels = np.zeros((n, N_CLASSES), dtype=np.float32)
    image_crcs: list[int] = []
    mask_crcs: list[int] = []
    # Decoders and resizes release the GIL: threads keep all cores busy.
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        with atomic_file(cache.images_path) as images, atomic_file(cache.masks_path) as masks:
            # Headers first, then the rows in order: plain sequential writes, so a full disk
            # is an OSError here rather than a crash when a memory map is flushed.
            _write_npy_header(images, (n, s, s, 3))
            _write_npy_header(masks, (n, s, s))
            rows = tqdm(
                pool.map(decode, range(n)), total=n, desc=f"caching {setname}", disable=None
            )
            for i, (image, mask, label) in enumerate(rows):
                hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
                m = np.ascontiguousarray(mask.numpy())
                if hwc.shape != (s, s, 3) or m.shape != (s, s) or hwc.dtype != np.uint8:
                    raise ValueError(f"decode({i}) gave {hwc.shape} {hwc.dtype} / {m.shape}")
                images.write(hwc.data)
                masks.write(m.data)
                image_crcs.append(zlib.crc32(hwc.data))
                mask_crcs.append(zlib.crc32(m.data))
                labels[i] = label
    finally:
        # After an error (a corrupt JPEG), do not wait for the thousands of decodes queued.
        pool.shutdown(wait=True, cancel_futures=True)
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "setname": setname,
        "image_size": s,
        "count": n,
        "image_ids": ids,
        "image_crc32": image_crcs,
        "mask_crc32": mask_crcs,
    }
    with atomic_file(_with_suffix(cache.stem, ".json")) as f:  # last: marks the build done
        f.write(json.dumps(meta).encode())
    return labels


def _write_npy_header(f, shape: tuple[int, ...]) -> None:
    header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)


def _check_free_space(folder: Path, needed: int) -> None:
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(
            f"The PASCAL cache needs {needed / 1e9:.2f} GB in {folder} but only "
            f"{free / 1e9:.2f} GB are free; free some space or set another cache_dir."
        )


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Holds an exclusive flock on `lock_path`; yields False where locks are unavailable.

    Without a lock, concurrent builders still never corrupt the cache (each writes its own
    temporary files and renames identical content into place); they only duplicate work.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # e.g. a network file system without lock support
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing releases the lock
