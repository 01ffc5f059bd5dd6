"""Listing one corpus argument (a folder, a file or a glob) so that every entry is accounted for.

fsspec's ``find`` and ``glob`` omit what they cannot list, and follow symlinks anywhere. Here a folder is
walked one listing at a time: a folder that cannot be listed, a broken symlink, a symlink that leads out of
the corpus (or back into a folder it is inside), and anything that is neither a file nor a folder come back
as an :class:`Entry` with a reason, to be quarantined. A symlink is followed only when it resolves inside the
corpus root, so nothing outside the corpus is read. Object stores have no folders to be denied and no
symlinks: one flat listing there. Every listing is retried on transient errors.
"""
from __future__ import annotations

import functools
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterator

from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from pipelines.artifacts.storage import Location, RetriesExhausted, is_object_store, one_line, retry

# Quarantine reasons of the listing (stable strings: users filter on them).
UNLISTABLE = "unlistable"
BROKEN_SYMLINK = "broken_symlink"
SYMLINK_OUTSIDE = "symlink_outside_corpus"
SYMLINK_LOOP = "symlink_loop"
NOT_A_FILE = "not_a_regular_file"


@dataclass(frozen=True)
class Entry:
    """A file to read (``reason`` empty; ``info`` is fsspec's), or an entry that cannot be read, and why."""

    path: str
    info: dict = field(default_factory=dict)
    reason: str = ""
    detail: str = ""


def has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def _glob_base(pattern: str) -> str:
    """The folder a glob's fixed prefix names (every match lies below it)."""
    first = min(i for i in (pattern.find(c) for c in "*?[") if i >= 0)
    return pattern[:first].rpartition("/")[0]


def _visible(path: str, base: str) -> bool:
    """Hidden files and folders (a name starting with '.') below ``base`` are not read."""
    rel = posixpath.relpath(path, base) if path.startswith(base) else posixpath.basename(path)
    return not any(part.startswith(".") for part in rel.split("/"))


def _excluded(loc: Location, exclude: Location | None, path: str) -> bool:
    """True for ``path`` inside ``exclude`` (the build's own ``--out``), on whatever filesystem."""
    return exclude is not None and exclude.contains(loc.url_for_path(path))


def _real(loc: Location, path: str) -> str:
    return os.path.realpath(path) if isinstance(loc.fs, LocalFileSystem) else path


@dataclass(frozen=True)
class _Walk:
    """One corpus walk: its filesystem, the real root symlinks must stay inside, what to leave out, and how
    deep to go (a glob's depth)."""

    loc: Location
    real_root: str
    exclude: Location | None
    maxdepth: int | None = None

    def skipped(self, path: str) -> bool:
        """Hidden names are not read, nor the build's own ``--out``."""
        return posixpath.basename(path.rstrip("/")).startswith(".") or _excluded(self.loc, self.exclude, path)

    def inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip("/") + "/")

    def entries(self, top: str) -> Iterator[Entry]:
        """Every file below ``top`` and every entry that cannot be read (depth first)."""
        stack = [(top, 0, frozenset({_real(self.loc, top)}))]
        while stack:
            folder, depth, chain = stack.pop()
            try:
                infos = retry(functools.partial(self.loc.fs.ls, folder, detail=True),
                              f"list {self.loc.url_for_path(folder)}")
            except RetriesExhausted:
                raise
            except Exception as e:  # noqa: BLE001 - a folder that cannot be listed is reported, not skipped
                yield Entry(folder, reason=UNLISTABLE, detail=one_line(e))
                continue
            for info in infos:
                if self.skipped(info["name"]):
                    continue
                entry, descend = self._classify(info, chain)
                if entry is not None:
                    yield entry
                if descend and (self.maxdepth is None or depth + 1 < self.maxdepth):
                    stack.append((info["name"], depth + 1, chain | {_real(self.loc, info["name"])}))

    def _classify(self, info: dict, chain: frozenset[str]) -> tuple[Entry | None, bool]:
        """(the entry to report, or None for a folder; whether to descend into it)."""
        path = info["name"]
        if info.get("islink") and isinstance(self.loc.fs, LocalFileSystem):
            return self._link(path, chain)
        if info.get("type") == "directory":
            return None, True
        if info.get("type") == "file":
            return Entry(path, info), False
        return Entry(path, reason=NOT_A_FILE, detail=f"a {info.get('type')} entry, not a file or folder"), False

    def _link(self, path: str, chain: frozenset[str]) -> tuple[Entry | None, bool]:
        """A symlink is what it resolves to, when that exists and lies inside the corpus root."""
        real = os.path.realpath(path)
        if not os.path.exists(real):
            return Entry(path, reason=BROKEN_SYMLINK, detail=f"points to {os.readlink(path)}, which does not exist"), False
        if not self.inside(real):
            return Entry(path, reason=SYMLINK_OUTSIDE, detail=f"resolves to {real}, outside {self.real_root}"), False
        if os.path.isdir(real):
            if real in chain:
                return Entry(path, reason=SYMLINK_LOOP, detail=f"resolves to {real}, a folder it is inside"), False
            return None, True
        if os.path.isfile(real):
            info = retry(functools.partial(self.loc.fs.info, path), f"list {self.loc.url_for_path(path)}")
            return Entry(path, info), False
        return Entry(path, reason=NOT_A_FILE, detail=f"resolves to {real}, which is not a file or folder"), False


def _glob_entries(loc: Location, pattern: str, exclude: Location | None) -> Iterator[Entry]:
    """The entries below the glob's fixed folder that match it, and every folder there that could not be
    listed (it may hold matches)."""
    base = _glob_base(pattern)
    depth = None if "**" in pattern else pattern[len(base) + 1:].count("/") + 1
    matches = re.compile(glob_translate(pattern)).match
    for entry in _Walk(loc, _real(loc, base), exclude, depth).entries(base):
        if entry.reason == UNLISTABLE or matches(entry.path):
            yield entry


def _flat_entries(loc: Location, exclude: Location | None) -> Iterator[Entry]:
    """Object storage: one paginated listing of the prefix (or glob); it answers whole or fails."""
    root = loc.root
    if has_glob(root):
        found, base = retry(functools.partial(loc.fs.glob, root, detail=True), f"list {loc.url}"), _glob_base(root)
    else:
        found, base = retry(functools.partial(loc.fs.find, root, detail=True, withdirs=False), f"list {loc.url}"), root
    for path, info in found.items():
        if info.get("type") == "file" and _visible(path, base) and not _excluded(loc, exclude, path):
            yield Entry(path, info)


def corpus_entries(loc: Location, exclude: Location | None = None) -> list[Entry]:
    """Every entry of one corpus argument, sorted by path (ids follow this order).

    Raises:
        FileNotFoundError: the corpus does not exist.
        RetriesExhausted: the storage kept failing.
    """
    fs, root, what = loc.fs, loc.root, f"list {loc.url}"
    if has_glob(root):
        found = _flat_entries(loc, exclude) if is_object_store(fs) else _glob_entries(loc, root, exclude)
    elif retry(functools.partial(fs.isdir, root), what):
        found = _flat_entries(loc, exclude) if is_object_store(fs) else _Walk(loc, _real(loc, root), exclude).entries(root)
    elif retry(functools.partial(fs.isfile, root), what):  # named by the user: read wherever it points
        found = iter([Entry(root, retry(functools.partial(fs.info, root), what))])
    else:
        raise FileNotFoundError(f"corpus {loc.url} does not exist")
    return sorted(found, key=lambda e: e.path)
