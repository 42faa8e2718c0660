"""Records that grow during a run (the metrics of RUN_DIR, the sample-log audit) as rolling JSONL part
files, which object stores can hold: they neither append nor let a reader tail an object.

    DIR/STEM.jsonl, DIR/STEM-00001.jsonl, DIR/STEM-00002.jsonl, ...   (one JSON record per line)

Readers read the parts in order (`read_records`, `PartTail`), whatever the store. One writer per
stem. It keeps the lines of its current part, and a flush writes them out:
- on a local disk it appends the new lines to the part (one part: STEM.jsonl, as a plain JSONL
  file; a continuing writer appends to it too);
- on an object store it PUTs the whole part again (the only way to grow an object), and after
  `records_per_part` records the part is closed and the next begins, so a flush never rewrites more
  than one part; a continuing writer (a resumed run) starts a new part and never rewrites another
  writer's.

When a reader sees a record: after the flush that writes it. A flush happens when a record is
written and `flush_s` seconds have passed since the last one, when the writer is told to
(`write(..., flush=True)`, `flush()`), and, with `start_timer()`, every `flush_s` seconds; so the
delay is at most `flush_s` plus one write (defaults: 0 s on a local disk, every record appended at
once; 5 s on an object store). A reader polls with PartTail: one LIST and one GET of the current
part per poll.

Cost on an object store (R = records_per_part = 200, a record ~1 KB): per flush one PUT of at most
R KB (200 KB); per record nothing until the flush. At W=64, B=4096 and report_every=10 (~4 records/s)
a part closes every ~50 s and a 3-day run leaves ~5,000 parts.
"""
import json
import threading
import time

from moco_ray import storage

def part_name(stem, index):
    return f"{stem}.jsonl" if index == 0 else f"{stem}-{index:05d}.jsonl"


def part_index(stem, name):
    """The number of a part file of `stem`, or None for any other name."""
    if name == f"{stem}.jsonl":
        return 0
    tail = name[len(stem) + 1:-len(".jsonl")]
    if name.startswith(f"{stem}-") and name.endswith(".jsonl") and len(tail) == 5 and tail.isdigit():
        return int(tail)
    return None


def parts(directory, stem):
    """(index, Location) of the part files of `stem` in a directory, in order."""
    directory = storage.at(directory)
    found = [(part_index(stem, name), name) for name, info in directory.children() if info.is_file]
    return [(i, directory / name) for i, name in sorted(n for n in found if n[0] is not None)]


def parse(data):
    """The records of complete lines (a torn last line, from a writer killed mid-write, is skipped)."""
    records = []
    for line in data.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def read_records(directory, stem):
    """Every record of every part, in the order written."""
    return [r for _, part in parts(directory, stem) for r in parse(part.read_bytes())]


class PartWriter:
    """Writes records to the part files of `stem` under `directory` (a path or URI); thread-safe."""

    def __init__(self, directory, stem, records_per_part=200, flush_s=None):
        self.directory, self.stem = storage.at(directory), stem
        local = self.directory.is_local
        self.records_per_part = None if local else records_per_part   # appending needs no roll
        self.flush_s = (0.0 if local else 5.0) if flush_s is None else flush_s
        existing = parts(self.directory, stem)
        self.index = 0 if local or not existing else existing[-1][0] + 1
        self.lines, self.flushed, self.last_flush = [], 0, time.monotonic()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def write(self, record, flush=False):
        """Adds one record (a JSON-serialisable dict); flushes when due or told to."""
        line = json.dumps(record, default=str) + "\n"
        with self.lock:
            self.lines.append(line)
            if flush or time.monotonic() - self.last_flush >= self.flush_s or self._full():
                self._flush()

    def _full(self):
        return self.records_per_part is not None and len(self.lines) >= self.records_per_part

    def flush(self):
        with self.lock:
            self._flush()

    def _flush(self):
        part = self.directory / part_name(self.stem, self.index)
        if self.directory.is_local:
            if self.lines:
                part.append_bytes("".join(self.lines).encode())
            self.lines = []
        else:
            if self.flushed < len(self.lines):
                part.write_bytes("".join(self.lines).encode())
                self.flushed = len(self.lines)
            if self._full():   # closed: the next record starts a new part
                self.index, self.lines, self.flushed = self.index + 1, [], 0
        self.last_flush = time.monotonic()

    def start_timer(self):
        """A daemon thread that flushes every flush_s seconds, so a record never waits for the next."""
        def loop():
            while not self.stopped.wait(max(self.flush_s, 0.5)):
                try:
                    self.flush()
                except Exception:   # a store that fails now may answer at the next tick
                    pass
        threading.Thread(target=loop, name="moco_ray-parts", daemon=True).start()

    def close(self):
        self.stopped.set()
        self.flush()


class PartTail:
    """The records written to the parts of `stem` since the last read(), in order, for a reader in
    another process. from_end: start after what is already there (a resumed run's live view). Reads
    only the bytes after the last complete line it returned (a ranged GET on an object store)."""

    def __init__(self, directory, stem, from_end=True):
        self.directory, self.stem = storage.at(directory), stem
        self.index, self.offset = 0, 0
        if from_end:
            existing = parts(self.directory, stem)
            if existing:
                self.index, self.offset = existing[-1][0], existing[-1][1].size()

    def read(self):
        records = []
        for i, part in parts(self.directory, self.stem):
            if i < self.index:
                continue
            if i > self.index:
                self.index, self.offset = i, 0
            try:
                size = part.size()
                if size < self.offset:   # replaced by a shorter file: read it again
                    self.offset = 0
                data = part.read_bytes(self.offset) if size > self.offset else b""
            except FileNotFoundError:
                break
            end = data.rfind(b"\n") + 1
            self.offset += end
            records.extend(parse(data[:end]))
        return records
