"""Saving and loading models and training state as safetensors, written atomically.

Atomic: a file is first written next to its destination under a temporary name, flushed to disk,
read back and verified, then renamed over the destination (os.replace is atomic on POSIX and Windows).
An interruption leaves either the old file or the new one, never half of one; the hidden temporary
file an interruption can leave behind is removed by the next save to that destination.

Verified: every file written here carries a SHA-256 checksum of its tensors and metadata (metadata
key "sha256"), checked whenever it is read, so a flipped byte or an edited step count is refused
instead of loading silently. A file that cannot be read (truncated, corrupt, not safetensors) is
reported with its path and what to do. A file without a checksum is refused too (a flipped bit in the key's
name must not turn checking off); one written before checksums existed gets one from ADD_CHECKSUM_COMMAND.

Nothing finished is replaced silently: `keep_earlier` moves an existing file aside to the first free
`<name>.v<k>.safetensors` (Lightning's version counter), which the training loop does before a fresh run would
write over another run's checkpoint, and `Trainer.export` before it would replace a model file.

Text files beside the models (model cards, results JSON) are written the same way by `write_text_atomic`.

Two kinds of file:
    training checkpoint   everything needed to continue exactly (weights, EMA weights, optimizer
                          moments, random-number states, data order), float32; see course_lib.train
    model file            a model's weights in float16 plus its config and how it was trained; small
                          enough to ship in the repository (each model's own module writes and reads
                          its kind: course_lib.unet_file for the U-Net, course_lib.vae, course_lib.clip)

Safetensors stores tensors plus a flat str -> str metadata dict; anything that is not a tensor
(configs, step counts) goes into the metadata as JSON. Nothing is unpickled, so loading a file from
elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file



CHECKPOINTS_ENV = "COURSE_CHECKPOINTS"


def checkpoints_dir() -> Path:
    """The folder of shipped checkpoints: $COURSE_CHECKPOINTS if set, else checkpoints/ in the repository."""
    return Path(os.environ.get(CHECKPOINTS_ENV) or Path(__file__).resolve().parent.parent / "checkpoints")


def shipped(name: str) -> Path:
    """Path of a shipped model file, e.g. shipped("ddpm_emoji32"), with a clear error if it is missing."""
    path = checkpoints_dir() / f"{name}.safetensors"
    if not path.is_file():
        known = sorted(p.stem for p in checkpoints_dir().glob("*.safetensors"))
        raise FileNotFoundError(f"no shipped checkpoint {name!r} at {path}; available: {', '.join(known) or 'none'}. "
                                f"Each is made by a command in scripts/ named in its model card ({name}.md).")
    return path


CHECKSUM_KEY = "sha256"
ADD_CHECKSUM_COMMAND = "python scripts/add_checksum.py"


class CorruptCheckpoint(ValueError):
    """A file that is not a readable safetensors file, or whose checksum does not match its contents."""


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the checksum itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for key in sorted(metadata or {}):
        if key != CHECKSUM_KEY:
            h.update(f"{key}={metadata[key]}|".encode())
    return h.hexdigest()


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete the hidden temporary files an interrupted save to `path` left behind (.<name>.<random>.tmp)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """save_file to a temporary file in the destination folder, fsync, read back and verify its checksum,
    then rename over `path`. Raises OSError naming the file (and leaving any earlier file intact) when the
    folder cannot be made or the disk is full."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"cannot save {path}: a parent of it is a file, not a folder ({e}). "
                                 f"Choose another path.") from None
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    remove_stale_temporaries(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        read(tmp)                               # verify what reached the disk before it replaces anything
        _publish(tmp, path)
    except (OSError, SafetensorError, CorruptCheckpoint) as e:
        kept = f"; the earlier {path.name} is unchanged" if path.exists() else ""
        raise OSError(f"could not write {path}: {e}. Check the folder is writable and the disk has room "
                      f"(about {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6:.1f} MB "
                      f"needed){kept}.") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def _publish(tmp: str, path: Path) -> None:
    """Give the finished temporary file the usual permissions (mkstemp makes files private), rename it over `path`
    and flush the rename to disk."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` the way atomic_save writes tensors: a hidden temporary file beside it,
    flushed to disk, then renamed over it, so a model card or a results file is the old one or the new one,
    never half of one. Makes the folder if needed; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk where the system allows opening a folder (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def keep_earlier(path: str | os.PathLike) -> Path | None:
    """Move an existing file at `path` aside to the first free `<stem>.v<k><suffix>` (k = 1, 2, ...) and return
    where it went (None if there was no file), so that nothing finished is overwritten."""
    path = Path(path)
    if not path.exists():
        return None
    k = 1
    while (kept := path.with_name(f"{path.stem}.v{k}{path.suffix}")).exists():
        k += 1
    os.replace(path, kept)
    _fsync_folder(path.parent)
    return kept


def read(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, its checksum verified (verify=False only for
    scripts/add_checksum.py, which adds a checksum to an older file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    advice = ("If it is a shipped file, restore it (git checkout -- <file>) or rebuild it with the command in "
              "its model card; if it is a training checkpoint, delete it to start afresh.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpoint(f"{path} is not a readable safetensors file ({e}): it is truncated, corrupt "
                                f"or of another format. {advice}") from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None and verify:
        raise CorruptCheckpoint(f"{path} has no checksum, so its contents cannot be verified: it was written "
                                f"before the course's files carried one, by another tool, or its checksum's key "
                                f"was damaged. If you trust the file, add one with `{ADD_CHECKSUM_COMMAND} {path}`; "
                                f"otherwise {advice[0].lower()}{advice[1:]}")
    if expected is not None and verify and checksum(tensors, metadata) != expected:
        raise CorruptCheckpoint(f"{path} does not match its checksum: its contents changed after it was "
                                f"written (a damaged or edited file). {advice}")
    metadata.pop(CHECKSUM_KEY, None)
    return tensors, metadata


def compact_state(module: torch.nn.Module, prefix: str = "", dtype: torch.dtype = torch.float16,
                  ) -> dict[str, torch.Tensor]:
    """A module's state dict for shipping: floating-point tensors cast to `dtype` (float16), keys prefixed."""
    return {f"{prefix}{k}": v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}


def read_format(path: str | os.PathLike, expected: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`read`, refusing a file whose metadata format is not `expected` (e.g. a training checkpoint given
    where a model file is wanted) with a message naming both."""
    tensors, metadata = read(path)
    if metadata.get("format") != expected:
        raise ValueError(f"{path} is not a course_lib {what} file (metadata format {metadata.get('format')!r}; "
                         f"expected {expected!r})")
    return tensors, metadata


def with_chain_totals(info: dict) -> dict:
    """`info` of a model file with 'steps_total' and 'train_seconds_total' added: its own run's plus those of the
    runs it was started from (its 'initialised_from', which counts the runs before that as 'earlier_steps' and
    'earlier_seconds'), so that a model's cost counts the whole chain."""
    first = info.get("initialised_from") or {}
    info["steps_total"] = sum(d.get(k) or 0 for d, k in ((info, "steps"), (first, "steps"), (first, "earlier_steps")))
    info["train_seconds_total"] = sum(d.get(k) or 0 for d, k in ((info, "train_seconds"), (first, "train_seconds"),
                                                                 (first, "earlier_seconds")))
    return info


# --- Model cards: blocks that other scripts write into them ----------------------------------------------

def _markers(name: str) -> tuple[str, str]:
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"a card section's name must be letters, digits and underscores; got {name!r}")
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def card_section(card: str, name: str) -> str | None:
    """The block of a model card between <!-- name --> and <!-- /name --> (markers included), or None."""
    start, end = _markers(name)
    i = card.find(start)
    j = card.find(end, i + len(start)) if i >= 0 else -1
    return card[i:j + len(end)] if i >= 0 and j >= 0 else None


def replace_card_section(card: str, name: str, body: str) -> str:
    """The card with its <!-- name --> block replaced by `body` between the markers; a card without one gets it
    before its "Licence" line (or at the end). So a benchmark can keep its table in a card that a training
    script rewrites (the training script carries the block over with card_section)."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    old = card_section(card, name)
    if old is not None:
        return card.replace(old, block, 1)
    k = card.find("\nLicence")
    if k < 0:
        return card.rstrip("\n") + "\n\n" + block + "\n"
    return card[:k].rstrip("\n") + "\n\n" + block + "\n" + card[k:]


__all__ = ["checkpoints_dir", "shipped", "CHECKSUM_KEY", "ADD_CHECKSUM_COMMAND", "CorruptCheckpoint", "checksum",
           "remove_stale_temporaries", "keep_earlier", "atomic_save", "write_text_atomic", "read", "compact_state",
           "read_format", "with_chain_totals", "card_section", "replace_card_section"]
