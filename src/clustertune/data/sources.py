"""Data files as a stream of records, whatever their container: the formats users bring.

    for where, item in read_items(Path("train.jsonl.gz")):
        ...  # item: one JSONL line (bytes), or an already parsed record (a dict, from JSON/Parquet/Arrow)

What is read, decided from the file's content rather than its name where the content can tell:

- JSON Lines: one record per line (the default for any text file).
- A JSON array of records, compact or pretty-printed: a file whose first non-blank character
  is `[`. One exception keeps a JSON Lines file whose first line happens to be an array a JSON
  Lines file (that line is then one invalid record): the first line is a complete JSON value and
  other non-blank lines follow it.
- gzip (`.gz`) or zstd (`.zst`) compression of either of the above: recognized by the magic
  bytes, so the extension does not matter. zstd needs the `zstandard` package.
- Parquet (magic bytes `PAR1`) and Arrow IPC files (`.arrow`, or magic `ARROW1`): one record
  per row; needs `pyarrow`. A null field counts as absent (a column exists in every row, so a
  null is how a table says "this row has no such field").
- A directory written by Hugging Face `datasets`' `save_to_disk` (state.json + Arrow files),
  read with pyarrow (the `datasets` package is not needed). A DatasetDict directory (several
  splits) is an error that names the split directories to use.

Where a record is, for error messages (`Where`): the line of a JSON Lines file; the line and
the 0-based index of a JSON array's element; the 0-based row of a Parquet/Arrow table.
Everything here is launcher-side code: no torch, and pyarrow/zstandard are imported only when a
file needs them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from clustertune.data.types import DataError

BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_JSON_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (json.loads skips exactly this)
_ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class Where:
    """A record's place in its file, as the user finds it in an editor or a dataframe."""

    line: int | None = None  # 1-based line of a text file
    index: int | None = None  # 0-based element of a JSON array, or row of a table

    def __str__(self) -> str:
        if self.line is None:
            return f"row {self.index}"
        return str(self.line) if self.index is None else f"{self.line} (record [{self.index}])"


def missing_file_error(path: Path, key: str | None = None) -> DataError:
    """'not found', with the absolute path that was looked for and, for a relative path, the
    directory it was resolved against (the current directory: where clustertune was started)."""
    what = f"{path}: data file not found" + (f" ({key})" if key else "")
    if path.is_absolute():
        return DataError(what)
    cwd = os.getcwd()
    return DataError(f"{what}: looked for {os.path.join(cwd, path)}. A relative data path is resolved against "
                     f"the current directory ({cwd}), not the recipe's: run clustertune from the directory the "
                     "paths are relative to, or give absolute paths")


def read_items(path: Path) -> Iterator[tuple[Where, Any]]:
    """Every record of a data file or saved-dataset directory, in order: (where, item), item
    being the raw bytes of a JSON Lines line (parsed by the caller, so one bad line is one bad
    record) or a parsed value. Raises DataError for what makes the whole file unreadable."""
    if path.is_dir():
        yield from _saved_dataset_rows(path)
        return
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise missing_file_error(path) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read data file: {err.strerror or err}") from None
    if head.startswith(_PARQUET_MAGIC):
        yield from _parquet_rows(path)
    elif head.startswith(_ARROW_FILE_MAGIC) or path.suffix == ".arrow":
        yield from _arrow_rows(path, [path])
    else:
        yield from _text_items(path, head)


# ------------------------------------------------------------------------------ text: JSONL, JSON

def _text_items(path: Path, head: bytes) -> Iterator[tuple[Where, Any]]:
    with _open_text(path, head) as stream:
        first = _first_significant_byte(path, stream)
    if first == b"[":
        with _open_text(path, head) as stream:
            data = _read_all(path, stream)
        if not _is_jsonl_starting_with_an_array(data):
            yield from _array_items(path, data)
            return
    with _open_text(path, head) as stream:
        yield from _jsonl_items(path, stream)


def _open_text(path: Path, head: bytes) -> BinaryIO:
    if head.startswith(_GZIP_MAGIC):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: zstd-compressed, and reading zstd needs the 'zstandard' package: "
                            "pip install zstandard (or decompress the file: zstd -d)") from None
        return io.BufferedReader(_ZstdReader(path.open("rb"), zstandard), buffer_size=1 << 20)
    return path.open("rb")


class _CorruptData(Exception):
    pass


class _ZstdReader(io.RawIOBase):
    """A zstd stream that fails on truncated input (zstandard's stream_reader just stops) and
    reads every frame of a multi-frame file (as `zstd -d` does)."""

    def __init__(self, raw: BinaryIO, zstandard: Any) -> None:
        super().__init__()
        self._raw, self._zstd = raw, zstandard
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise _CorruptData("the zstd data ends in the middle of a frame (truncated file?)")
                return 0
            self._decompress(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> None:
        while chunk:
            self._in_frame = True
            try:
                self._pending += self._dobj.decompress(chunk)
            except self._zstd.ZstdError as err:
                raise _CorruptData(f"corrupt zstd data: {err}") from None
            if not self._dobj.eof:
                return
            self._in_frame = False
            chunk = self._dobj.unused_data
            self._dobj = self._zstd.ZstdDecompressor().decompressobj()

    def close(self) -> None:
        self._raw.close()
        super().close()


_READ_ERRORS = (OSError, EOFError, zlib.error, _CorruptData)


def _read_error(path: Path, err: BaseException, after_line: int | None = None) -> DataError:
    where = f" after line {after_line}" if after_line else ""
    return DataError(f"{path}: cannot read the file{where}: {err} (a truncated or corrupt compressed file?)")


def _first_significant_byte(path: Path, stream: BinaryIO) -> bytes:
    """The first byte that is not JSON whitespace (after a UTF-8 byte-order mark), or b""."""
    start = True
    try:
        while chunk := stream.read(1 << 16):
            if start:
                chunk, start = chunk.removeprefix(BOM), False
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1]
    except _READ_ERRORS as err:
        raise _read_error(path, err) from None
    return b""


def _read_all(path: Path, stream: BinaryIO) -> bytes:
    try:
        return stream.read()
    except _READ_ERRORS as err:
        raise _read_error(path, err) from None


def _is_jsonl_starting_with_an_array(data: bytes) -> bool:
    """A file starting with `[` is a JSON array, unless its first line is a whole JSON value
    and more non-blank lines follow: then it is JSON Lines whose first record is an array."""
    first, _, rest = data.removeprefix(BOM).partition(b"\n")
    if not rest.strip():
        return False
    try:
        json.loads(first)
    except RecursionError:  # a whole value, only nested too deeply for Python: one bad record
        return True
    except ValueError:  # bad JSON or bad UTF-8: not a whole value
        return False
    return True


def _jsonl_items(path: Path, stream: BinaryIO) -> Iterator[tuple[Where, bytes]]:
    line_no = 0
    try:
        for line_no, raw in enumerate(stream, 1):
            yield Where(line_no), raw.removeprefix(BOM) if line_no == 1 else raw
    except _READ_ERRORS as err:
        raise _read_error(path, err, after_line=line_no) from None


def _array_items(path: Path, data: bytes) -> Iterator[tuple[Where, Any]]:
    """Elements of one JSON array, each with the line it starts on. A syntax error anywhere
    makes the rest unreadable, so it is an error for the file, with its line and column."""
    data = data.removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8: invalid byte 0x{data[err.start]:02x} (a JSON array file must "
                        "be UTF-8 throughout)") from None
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0) + 1  # past the `[`
    line, counted, index = 1, 0, 0
    pos = _skip_ws(text, pos)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}: bad JSON in the array (record [{index}]): {err.msg} "
                                f"at column {err.colno}") from None
            except RecursionError:
                raise DataError(f"{path}:{line}: bad JSON in the array (record [{index}]): nested too deeply") from None
            yield Where(line, index), value
            index += 1
            pos = _skip_ws(text, end)
            if text.startswith(",", pos):
                pos = _skip_ws(text, pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise _array_syntax_error(path, text, pos, f"expected ',' or ']' after record [{index - 1}]")
    if text[pos:].strip(" \t\r\n"):
        raise _array_syntax_error(path, text, _skip_ws(text, pos), "unexpected data after the array's closing ']'")


def _skip_ws(text: str, pos: int) -> int:
    return _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]  # matches the empty string too


def _array_syntax_error(path: Path, text: str, pos: int, what: str) -> DataError:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return DataError(f"{path}:{line}: bad JSON in the array: {what} at column {column}")


def spans_lines(path: Path) -> bool:
    """Whether a text data file holds one or more JSON values spread over several lines (a
    pretty-printed object, `json.dump(obj, f, indent=2)`), to explain why its lines are not
    JSON Lines records. Read only after the file failed as JSON Lines."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
        with _open_text(path, head) as stream:
            text = _read_all(path, stream).removeprefix(BOM).decode("utf-8")
    except (OSError, UnicodeDecodeError, DataError):
        return False
    decoder, pos, values = json.JSONDecoder(), _skip_ws(text, 0), 0
    try:
        while pos < len(text):
            _, pos = decoder.raw_decode(text, pos)
            pos, values = _skip_ws(text, pos), values + 1
    except (json.JSONDecodeError, RecursionError):
        return False
    return values > 0 and text.strip().count("\n") >= values


# ------------------------------------------------------------------------------ tables: Parquet, Arrow

def _pyarrow(path: Path, what: str) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401  (submodules are not imported by `import pyarrow`)
    except ImportError:
        raise DataError(f"{path}: reading {what} needs the 'pyarrow' package: pip install pyarrow") from None
    return pyarrow


def _parquet_rows(path: Path) -> Iterator[tuple[Where, Any]]:
    pa = _pyarrow(path, "Parquet")
    try:
        batches = pa.parquet.ParquetFile(path).iter_batches(batch_size=_ROWS_PER_BATCH)
        yield from _rows(batches)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None


def _arrow_rows(shown: Path, files: list[Path]) -> Iterator[tuple[Where, Any]]:
    """Rows of Arrow IPC files, numbered across the files (as `datasets` numbers its shards)."""
    pa = _pyarrow(shown, "Arrow files")
    start = 0
    for file in files:
        try:
            table = _read_arrow_table(pa, file)
        except FileNotFoundError:
            raise DataError(f"{shown}: {file.name} is listed in state.json but missing") from None
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{file}: not a readable Arrow file: {err}") from None
        yield from _rows(table.to_batches(max_chunksize=_ROWS_PER_BATCH), start)
        start += table.num_rows


def _read_arrow_table(pa: Any, file: Path) -> Any:
    # `datasets` writes the streaming format; `pyarrow.feather`/`ipc.new_file` the file format.
    with pa.memory_map(str(file)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def _rows(batches: Any, start: int = 0) -> Iterator[tuple[Where, Any]]:
    index = start
    for batch in batches:
        for row in batch.to_pylist():
            yield Where(index=index), _without_nulls(row)
            index += 1


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _saved_dataset_rows(path: Path) -> Iterator[tuple[Where, Any]]:
    """A directory from `Dataset.save_to_disk`: state.json lists its Arrow shards in order."""
    splits_file, state_file = path / "dataset_dict.json", path / "state.json"
    if splits_file.is_file():
        splits = _json_file(splits_file).get("splits", [])
        names = ", ".join(str(path / s) for s in splits) or "none listed"
        raise DataError(f"{path}: a DatasetDict saved with save_to_disk (splits: {', '.join(splits)}); give one "
                        f"split's directory instead: {names}")
    if not state_file.is_file():
        raise DataError(f"{path}: a directory, and not one written by datasets' save_to_disk (no state.json): "
                        "list the data files themselves in data.train_files")
    shards = _json_file(state_file).get("_data_files")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "filename" in s for s in shards):
        raise DataError(f"{state_file}: no '_data_files' list of {{\"filename\": ...}} entries (not a datasets "
                        "save_to_disk directory?)")
    yield from _arrow_rows(path, [path / s["filename"] for s in shards])


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def digest_paths(path: Path) -> list[Path]:
    """The files whose bytes make up a data path: the file itself, or every file of a saved
    dataset directory (sorted), for the tokenized cache's key."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())
