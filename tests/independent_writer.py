#!/usr/bin/env python3
"""An independent writer of Ivy data directories, written from storage-format.md alone.

The other half of `independent_reader.py`: where that one checks that the page is enough to read
what Ivy writes, this one checks that what the page allows, Ivy reads. It writes choices Ivy's own
writer never makes (another index interval, segments cut at other sizes, a last segment that is
sealed) and `tests/independent_reader.rs` has the engine verify and read the result.

    independent_writer.py DIR STREAM_DEPTH SEGMENT_BYTES INDEX_INTERVAL < EVENTS

EVENTS: one event per line, `ID PATH DATA_HEX`, ids strictly increasing, paths valid. DIR must
not exist. Every stream's segments are sealed when the next event would take them past
SEGMENT_BYTES; a stream's last segment is left live, except in streams whose name ends in `s`,
where it is sealed too (a process that stopped right after a seal).
"""

import os
import struct
import sys
import zlib

SEGMENT_HEADER_LEN = 32
RECORD_HEADER_LEN = 28


def crc32(data):
    return zlib.crc32(data) & 0xFFFFFFFF


def segment_header(first_id):
    head = b"\x89IVYSEG\n" + struct.pack("<IIQI", 1, SEGMENT_HEADER_LEN, first_id, 0)
    return head + struct.pack("<I", crc32(head))


def record(kind, event_id, prev, path, data):
    body = struct.pack(
        "<IBBHQQ", RECORD_HEADER_LEN + len(path) + len(data), kind, 0, len(path), event_id, prev
    )
    body += path + data
    return struct.pack("<I", crc32(body)) + body


class Segment:
    def __init__(self, first_id):
        self.first_id = first_id
        self.bytes = bytearray(segment_header(first_id))
        # path -> [first_offset, last_offset, count]
        self.chains = {}
        self.events = []  # (id, offset)
        self.is_sealed = False

    def append(self, event_id, path, data):
        offset = len(self.bytes)
        chain = self.chains.setdefault(path, [offset, 0, 0])
        self.bytes += record(1, event_id, chain[1], path, data)
        chain[1] = offset
        chain[2] += 1
        self.events.append((event_id, offset))

    def seal(self):
        paths = sorted(self.chains)  # bytewise: the paths are bytes
        table, positions = b"", b""
        for path in paths:
            first, last, count = self.chains[path]
            positions += struct.pack("<Q", len(table))
            table += struct.pack("<H", len(path)) + path + struct.pack("<QQQ", first, last, count)
        footer = struct.pack(
            "<IIQQQQQ",
            1,
            0,
            len(self.events),
            self.events[0][0],
            self.events[-1][0],
            len(paths),
            len(table),
        )
        footer += table + positions
        seal_offset = len(self.bytes)
        last_id, last_offset = self.events[-1]
        self.bytes += record(2, last_id, last_offset, b"", footer)
        self.bytes += struct.pack("<Q", seal_offset) + b"IVYSEAL\n"
        self.is_sealed = True

    def index(self, interval):
        entries = []
        for event_id, offset in self.events:
            if not entries or offset >= entries[-1][1] + interval:
                entries.append((event_id, offset))
        body = b"".join(struct.pack("<QQ", i, o) for i, o in entries)
        head = b"\x89IVYIDX\n" + struct.pack(
            "<IIQQIII", 1, 48, self.first_id, len(entries), interval, crc32(body), 0
        )
        return head + struct.pack("<I", crc32(head)) + body


def stream_name(path, depth):
    segments = [s for s in path.split(b"/") if s][:depth]
    return "~" + "~".join(s.decode() for s in segments)


def main(argv):
    if len(argv) != 5:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    root, depth, segment_bytes, interval = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    os.makedirs(os.path.join(root, "streams"))
    with open(os.path.join(root, "IVY"), "w") as f:
        f.write("ivy data directory\nformat 1\nstream_depth %d\n" % depth)
    streams = {}  # name -> [sealed segments..., live segment]
    for line in sys.stdin:
        event_id, path, data = line.split(" ")
        event_id, path, data = int(event_id), path.encode(), bytes.fromhex(data.strip())
        segments = streams.setdefault(stream_name(path, depth), [])
        size = RECORD_HEADER_LEN + len(path) + len(data)
        if segments and len(segments[-1].bytes) + size > segment_bytes and segments[-1].events:
            segments[-1].seal()
        if not segments or segments[-1].is_sealed:
            segments.append(Segment(event_id))
        segments[-1].append(event_id, path, data)
    for name, segments in streams.items():
        if name.endswith("s"):
            segments[-1].seal()
        directory = os.path.join(root, "streams", name)
        os.makedirs(directory)
        for seg in segments:
            base = os.path.join(directory, "%020d" % seg.first_id)
            with open(base + ".seg", "wb") as f:
                f.write(seg.bytes)
            if seg.is_sealed:
                with open(base + ".idx", "wb") as f:
                    f.write(seg.index(interval))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
