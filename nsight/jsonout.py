"""Write a converter's JSON document whole or not at all, with its long arrays streamed from disk.

A converter that holds every kernel of a long profile in memory needs many times the input's
size; instead it adds each record to a ``Spool`` (an anonymous temporary file, gone even if the
process is killed) as soon as the record is complete, puts the spool in the document where the
array goes, and ``write_document`` streams it into place. Each spooled record is one line of
compact JSON (the C encoder: several times faster than an indented dump); the rest of the
document is indented as before.

The output file appears atomically: a temp file beside it, fsync, then os.replace, so a reader
never sees half a document and a failed or killed conversion leaves the previous file as it was.
Temp files are named .<file>.<host>.<pid>.<random>.tmp and the next write into the directory
removes those of writers that no longer run (the scheme of sparsek/bench/results.py; the nsight
scripts run as plain files, without the sparsek package).
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", platform.node()) or "host"
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_COPY_CHUNK = 1 << 20


class Spool:
    """The items of one JSON array that is the value of a top-level key of the document."""

    def __init__(self):
        self._file = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.count = 0

    def add(self, item) -> None:
        if self.count:
            self._file.write(",\n")
        self._file.write("  " + json.dumps(item))
        self.count += 1

    def copy_to(self, out) -> None:
        if not self.count:
            out.write("[]")
            return
        out.write("[\n")
        self._file.flush()
        self._file.seek(0)
        shutil.copyfileobj(self._file, out, _COPY_CHUNK)
        out.write("\n ]")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_document(doc: dict, output: str) -> None:
    """``doc`` as JSON (indent 1) to the file ``output`` ("-": stdout), Spool values streamed in."""
    spools: dict[str, Spool] = {}

    def placeholder(obj):
        if not isinstance(obj, Spool):
            raise TypeError(f"cannot write {type(obj).__name__} as JSON")
        token = f"\0spool-{len(spools)}\0"
        spools[json.dumps(token)] = obj
        return token

    text = json.dumps(doc, indent=1, default=placeholder) + "\n"
    pieces = re.split("(" + "|".join(map(re.escape, spools)) + ")", text) if spools else [text]

    def emit(out) -> None:
        for piece in pieces:
            if piece in spools:
                spools[piece].copy_to(out)
            else:
                out.write(piece)

    if output == "-":
        emit(sys.stdout)
        sys.stdout.flush()
        return
    path = Path(output)
    _remove_stale_temps(path.parent)
    tmp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            emit(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temps(directory: Path) -> None:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:
                os.unlink(directory / name)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
