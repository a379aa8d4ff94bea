#!/usr/bin/env python3
"""An independent reader of Ivy data directories, written from storage-format.md alone.

It shares no code with Ivy: another language, Python's standard library, zlib's CRC-32. When it
and the engine read a directory alike, the page is enough to read Ivy's archives without Ivy.
`tests/independent_reader.rs` runs it on the committed format-1 archive, on directories the
engine writes, and on damaged copies, and compares.

    independent_reader.py DIR [--channel PATH | --from SECONDS.NANOS]

Prints one line per event, in id order: `SECONDS.NANOS PATH DATA_HEX`.
- with no option, every event, each segment read whole and checked against everything the page
  promises (chains, seal footers, indexes, ids, stream names);
- `--channel PATH`, one channel's events, found as a reader that skips its neighbours would:
  through the seal footer's channel table and the channel chain in sealed segments;
- `--from ID`, the events with an id at or after ID, found through the sparse indexes.

Problems go to stderr, one per line: `FILE: byte OFFSET: what`, FILE relative to DIR. Exit 0
when there is none, 1 when there is any, 2 when DIR cannot be read as a format-1 directory.
"""

import os
import struct
import sys
import zlib

SEGMENT_MAGIC = b"\x89IVYSEG\n"
INDEX_MAGIC = b"\x89IVYIDX\n"
SEAL_MAGIC = b"IVYSEAL\n"
SEGMENT_HEADER_LEN = 32
RECORD_HEADER_LEN = 28
INDEX_HEADER_LEN = 48
TRAILER_LEN = 16
FOOTER_FIXED_LEN = 48
KIND_EVENT, KIND_SEAL = 1, 2
SEGMENT_BYTES = set(b"0123456789abcdefghijklmnopqrstuvwxyz._-")


class Unreadable(Exception):
    """The directory is not one this reader knows how to read (exit 2)."""


class Damage(Exception):
    """Bytes that fail the page's checks, at `offset` of the file being read."""

    def __init__(self, offset, what):
        super().__init__(what)
        self.offset = offset
        self.what = what


def crc32(data):
    return zlib.crc32(data) & 0xFFFFFFFF


def u16(buf, at):
    return struct.unpack_from("<H", buf, at)[0]


def u32(buf, at):
    return struct.unpack_from("<I", buf, at)[0]


def u64(buf, at):
    return struct.unpack_from("<Q", buf, at)[0]


def format_id(event_id):
    seconds, nanos = divmod(event_id, 1_000_000_000)
    return "%010d.%09d" % (seconds, nanos)


def parse_id(text):
    seconds, _, nanos = text.lstrip("@").partition(".")
    if not seconds.isdigit() or (nanos and not nanos.isdigit()) or len(nanos) > 9:
        raise ValueError("not SECONDS.NANOS: %r" % text)
    return int(seconds) * 1_000_000_000 + int(nanos.ljust(9, "0") or "0")


def is_channel_path(raw):
    """`/`, or `/`-separated segments of 1..=64 bytes of [0-9a-z._-], never `.` or `..`."""
    if raw == b"/":
        return True
    if not raw.startswith(b"/") or len(raw) > 255:
        return False
    segments = raw[1:].split(b"/")
    return len(segments) <= 32 and all(
        1 <= len(seg) <= 64 and seg not in (b".", b"..") and set(seg) <= SEGMENT_BYTES
        for seg in segments
    )


def stream_of(path, depth):
    """The stream directory name of a channel: its first `depth` segments, `/` written `~`."""
    segments = [s for s in path.split("/") if s][:depth]
    return "~" + "~".join(segments)


class Record:
    __slots__ = ("offset", "length", "kind", "id", "prev", "path", "data")

    def __init__(self, offset, length, kind, event_id, prev, path, data):
        self.offset, self.length, self.kind = offset, length, kind
        self.id, self.prev, self.path, self.data = event_id, prev, path, data

    @property
    def end(self):
        return self.offset + self.length


def decode_record(buf, at):
    """The record at `at`, with the page's checks in the page's order."""
    if at + RECORD_HEADER_LEN > len(buf):
        raise Damage(at, "record header runs past the end of the file")
    stored, length, kind, _flags, path_len, event_id, prev = struct.unpack_from(
        "<IIBBHQQ", buf, at
    )
    if length < RECORD_HEADER_LEN + path_len:
        raise Damage(at, "record length %d is shorter than its header and path" % length)
    if at + length > len(buf):
        raise Damage(at, "record runs past the end of the file")
    if crc32(buf[at + 4 : at + length]) != stored:
        raise Damage(at, "record CRC mismatch")
    if kind not in (KIND_EVENT, KIND_SEAL):
        raise Damage(at, "unknown record kind %d" % kind)
    path = bytes(buf[at + RECORD_HEADER_LEN : at + RECORD_HEADER_LEN + path_len])
    if kind == KIND_EVENT and not is_channel_path(path):
        raise Damage(at, "invalid channel path")
    data = bytes(buf[at + RECORD_HEADER_LEN + path_len : at + length])
    return Record(at, length, kind, event_id, prev, path.decode(), data)


def decodes(buf, at):
    try:
        decode_record(buf, at)
        return True
    except Damage:
        return False


def decode_segment_header(buf, name_id):
    if len(buf) < SEGMENT_HEADER_LEN:
        raise Damage(0, "shorter than a segment header")
    if buf[:8] != SEGMENT_MAGIC:
        raise Damage(0, "not a segment (magic)")
    if u32(buf, 8) != 1:
        raise Unreadable("segment version %d is not 1" % u32(buf, 8))
    if u32(buf, 12) != SEGMENT_HEADER_LEN or crc32(buf[:28]) != u32(buf, 28):
        raise Damage(0, "segment header fails its checks")
    if u64(buf, 16) != name_id:
        raise Damage(16, "first_id differs from the file name")


class Footer:
    def __init__(self, seal):
        body = seal.data
        at = seal.end - len(body)
        if len(body) < FOOTER_FIXED_LEN:
            raise Damage(at, "footer shorter than its fixed part")
        if u32(body, 0) != 1:
            raise Unreadable("footer version %d is not 1" % u32(body, 0))
        (
            self.event_count,
            self.first_id,
            self.last_id,
            self.channel_count,
            table_len,
        ) = struct.unpack_from("<QQQQQ", body, 8)
        self.table = body[FOOTER_FIXED_LEN : FOOTER_FIXED_LEN + table_len]
        self.positions = body[FOOTER_FIXED_LEN + table_len :]
        if len(self.table) != table_len or len(self.positions) != 8 * self.channel_count:
            raise Damage(at, "footer's table length and channel count disagree")
        self.at = at

    def entry(self, i):
        """(path, first_offset, last_offset, count) of the i-th channel, in path order."""
        pos = u64(self.positions, 8 * i)
        if pos + 2 > len(self.table):
            raise Damage(self.at, "channel table position out of the table")
        path_len = u16(self.table, pos)
        end = pos + 2 + path_len + 24
        if end > len(self.table):
            raise Damage(self.at, "channel table entry out of the table")
        path = bytes(self.table[pos + 2 : pos + 2 + path_len])
        first, last, count = struct.unpack_from("<QQQ", self.table, pos + 2 + path_len)
        return path.decode(errors="replace"), first, last, count

    def find(self, path):
        """Binary search of the channel table, bytewise as the page orders it."""
        lo, hi = 0, self.channel_count
        key = path.encode()
        while lo < hi:
            mid = (lo + hi) // 2
            entry = self.entry(mid)
            if entry[0].encode() < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.channel_count and self.entry(lo)[0] == path:
            return self.entry(lo)
        return None


def seal_of(buf, is_last):
    """The seal record of a sealed segment, or None when the segment is live."""
    if len(buf) < SEGMENT_HEADER_LEN + TRAILER_LEN or buf[-8:] != SEAL_MAGIC:
        return None
    seal_at = u64(buf, len(buf) - TRAILER_LEN)
    try:
        seal = decode_record(buf, seal_at)
    except (Damage, struct.error):
        return None
    if seal.kind != KIND_SEAL or seal.end + TRAILER_LEN != len(buf):
        return None
    if is_last:
        # An event's data may end with a seal and a trailer: in the last segment, the records
        # walked from the header must lead to this seal, not step over it.
        at = SEGMENT_HEADER_LEN
        while at < seal_at:
            try:
                at = decode_record(buf, at).end
            except Damage:
                break  # damage before the seal: a sealed segment, damaged
        else:
            if at != seal_at:
                return None
    return seal


class Segment:
    def __init__(self, reader, stream, name, is_last):
        self.reader = reader
        self.rel = os.path.join("streams", stream, name)
        self.first_id = int(name[:-4])
        with open(os.path.join(reader.dir, self.rel), "rb") as f:
            self.buf = f.read()
        self.is_last = is_last
        try:
            decode_segment_header(self.buf, self.first_id)
        except Damage:
            rest = self.buf[SEGMENT_HEADER_LEN:]
            if is_last and rest.count(0) == len(rest):
                raise Damage(0, "segment torn at creation: holds no event")
            raise
        self.seal = seal_of(self.buf, is_last)
        self.footer = Footer(self.seal) if self.seal else None
        self.records_end = self.seal.offset if self.seal else len(self.buf)
        # The event records alone: in a sealed segment no record may run into the seal.
        self.records = memoryview(self.buf)[: self.records_end]

    def scan(self, start=SEGMENT_HEADER_LEN):
        """Event records from `start` on, up to the end of valid data as the page defines it."""
        at, previous = start, None
        while at < self.records_end:
            try:
                rec = decode_record(self.records, at)
            except Damage as damage:
                self.classify_end(damage)
                return
            if rec.kind == KIND_SEAL:
                # In a live segment: a seal whose trailer is missing, a torn tail.
                self.classify_end(Damage(at, "seal record without a trailer"), torn=True)
                return
            if previous is not None and rec.id <= previous:
                raise Damage(at, "ids do not increase")
            previous = rec.id
            yield rec
            at = rec.end

    def classify_end(self, damage, torn=False):
        at = damage.offset
        if self.seal is not None:
            raise damage  # in a sealed segment every failure is corruption
        rest = self.buf[at:]
        if not torn and rest.count(0) == len(rest):
            return  # free space: the zero-filled rest of a segment made from a spare
        if not torn and len(rest) >= 8:
            length = u32(self.buf, at + 4)
            if length >= RECORD_HEADER_LEN and decodes(self.buf, at + length):
                raise Damage(at, "corruption: %s, with a valid record after it" % damage.what)
        if not self.is_last:
            raise Damage(at, "a segment that is not its stream's last is not sealed")
        self.reader.problem(self.rel, at, "torn tail (%s), %d bytes" % (damage.what, len(rest)))

    def check_whole(self, depth, stream):
        """Every event of the segment, checked against the page; returns them."""
        events, chains = [], {}
        for rec in self.scan():
            if not events and rec.id != self.first_id:
                raise Damage(rec.offset, "first event's id differs from first_id")
            if stream_of(rec.path, depth) != stream:
                raise Damage(rec.offset, "channel %s is not of stream %s" % (rec.path, stream))
            first, last, count = chains.get(rec.path, (rec.offset, 0, 0))
            if rec.prev != last:
                raise Damage(rec.offset + 20, "prev is not the channel's previous record")
            chains[rec.path] = (first, rec.offset, count + 1)
            events.append(rec)
        if self.seal is None:
            return events
        footer, seal = self.footer, self.seal
        if not events or seal.id != events[-1].id or seal.prev != events[-1].offset:
            raise Damage(seal.offset, "seal record does not name the last event")
        summary = (footer.event_count, footer.first_id, footer.last_id, footer.channel_count)
        if summary != (len(events), events[0].id, events[-1].id, len(chains)):
            raise Damage(footer.at, "footer counts or ids differ from the records")
        table = [footer.entry(i) for i in range(footer.channel_count)]
        if [e[0].encode() for e in table] != sorted(p.encode() for p in chains):
            raise Damage(footer.at, "channel table is not the channels, sorted")
        for path, first, last, count in table:
            if chains[path] != (first, last, count):
                raise Damage(footer.at, "channel table entry of %s differs" % path)
        self.check_index(events)
        return events

    def index(self):
        """The index entries, or None when the file is missing or fails its checks."""
        path = os.path.join(self.reader.dir, self.rel[:-4] + ".idx")
        try:
            with open(path, "rb") as f:
                buf = f.read()
        except FileNotFoundError:
            return None
        if len(buf) < INDEX_HEADER_LEN or buf[:8] != INDEX_MAGIC:
            return None
        if u32(buf, 8) != 1:
            raise Unreadable("index version %d is not 1" % u32(buf, 8))
        count = u64(buf, 24)
        if (
            u32(buf, 12) != INDEX_HEADER_LEN
            or crc32(buf[:44]) != u32(buf, 44)
            or u32(buf, 40) != 0
            or u64(buf, 16) != self.first_id
            or len(buf) != INDEX_HEADER_LEN + 16 * count
            or crc32(buf[INDEX_HEADER_LEN:]) != u32(buf, 36)
        ):
            return None
        entries = [struct.unpack_from("<QQ", buf, INDEX_HEADER_LEN + 16 * i) for i in range(count)]
        return u32(buf, 32), entries

    def check_index(self, events):
        index = self.index()
        if index is None:
            self.reader.problem(self.rel[:-4] + ".idx", 0, "index missing or unusable")
            return
        interval, entries = index
        expected = []
        for rec in events:
            if not expected or rec.offset >= expected[-1][1] + interval:
                expected.append((rec.id, rec.offset))
        if entries != expected:
            self.reader.problem(self.rel[:-4] + ".idx", 48, "entries break the sparsity rule")

    def channel(self, path):
        """One channel's events, oldest first: by its chain in a sealed segment."""
        if self.footer is None:
            return [rec for rec in self.scan() if rec.path == path]
        entry = self.footer.find(path)
        if entry is None:
            return []
        _, first, at, count = entry
        chain = []
        while at != 0:
            rec = decode_record(self.records, at)
            if rec.kind != KIND_EVENT or rec.path != path or (rec.prev and rec.prev >= at):
                raise Damage(at, "chain link is not an earlier record of %s" % path)
            chain.append(rec)
            at = rec.prev
        if len(chain) != count or chain[-1].offset != first:
            raise Damage(self.footer.at, "chain of %s differs from its table entry" % path)
        return chain[::-1]

    def since(self, first_id):
        """Events with an id at or after `first_id`: through the index in a sealed segment."""
        if self.footer is not None and self.footer.last_id < first_id:
            return []
        start = SEGMENT_HEADER_LEN
        index = self.index() if self.footer is not None else None
        if index is not None:
            before = [offset for event_id, offset in index[1] if event_id <= first_id]
            start = before[-1] if before else SEGMENT_HEADER_LEN
        return [rec for rec in self.scan(start) if rec.id >= first_id]


class DataDirectory:
    def __init__(self, path):
        self.dir = path
        self.problems = 0
        try:
            with open(os.path.join(path, "IVY"), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise Unreadable("no IVY file: %s" % e)
        if len(lines) != 3 or lines[0] != "ivy data directory" or lines[1] != "format 1":
            raise Unreadable("IVY does not say `ivy data directory`, `format 1`")
        key, _, depth = lines[2].partition(" ")
        if key != "stream_depth" or not depth.isdigit() or int(depth) < 1:
            raise Unreadable("IVY has no stream_depth")
        self.depth = int(depth)

    def problem(self, rel, offset, what):
        self.problems += 1
        print("%s: byte %d: %s" % (rel, offset, what), file=sys.stderr)

    def streams(self):
        root = os.path.join(self.dir, "streams")
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        for stream in names:
            segs = sorted(
                n
                for n in os.listdir(os.path.join(root, stream))
                if n.endswith(".seg") and len(n) == 24 and n[:20].isdigit()
            )
            yield stream, segs

    def segments(self, only_stream=None):
        for stream, names in self.streams():
            if only_stream is not None and stream != only_stream:
                continue
            for i, name in enumerate(names):
                rel = os.path.join("streams", stream, name)
                try:
                    yield stream, Segment(self, stream, name, i + 1 == len(names))
                except Damage as damage:
                    self.problem(rel, damage.offset, damage.what)

    def events(self, select):
        """The events `select(stream, segment)` returns, merged by id across streams."""
        found, last_of_stream = [], {}
        for stream, seg in self.segments():
            try:
                selected = select(stream, seg)
            except Damage as damage:
                self.problem(seg.rel, damage.offset, damage.what)
                continue
            # Within a stream, file order is id order: a segment's events follow the last one's.
            if selected and selected[0].id <= last_of_stream.get(stream, -1):
                self.problem(seg.rel, selected[0].offset, "id not above the previous segment's")
            if selected:
                last_of_stream[stream] = selected[-1].id
            found.extend(selected)
        found.sort(key=lambda rec: rec.id)
        for a, b in zip(found, found[1:]):
            if a.id == b.id:
                self.problem("streams", 0, "id %s appears twice" % format_id(a.id))
        return found


def main(argv):
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] not in ("--channel", "--from")):
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    try:
        store = DataDirectory(argv[1])
        if len(argv) == 2:
            events = store.events(lambda stream, seg: seg.check_whole(store.depth, stream))
        elif argv[2] == "--channel":
            path = argv[3]
            stream = stream_of(path, store.depth)
            events = store.events(lambda s, seg: seg.channel(path) if s == stream else [])
        else:
            first_id = parse_id(argv[3])
            events = store.events(lambda stream, seg: seg.since(first_id))
    except (Unreadable, ValueError, OSError) as e:
        print("cannot read %s: %s" % (argv[1], e), file=sys.stderr)
        return 2
    out = sys.stdout
    for rec in events:
        out.write("%s %s %s\n" % (format_id(rec.id), rec.path, rec.data.hex()))
    return 1 if store.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
