"""Append-only fragmented mp4 on disk, one self-contained write per flush.

FFmpeg's mp4 muxer keeps the newest fragment (and its interleaving queue) in memory until a later
packet arrives, and PyAV has no call to flush it. So each flush muxes the pending packets into a
fresh in-memory mp4 (same stream parameters, copied from the encoders' streams), closes it, and
appends its `moof` + `mdat` boxes to the file in one write; the first flush also writes the init
boxes (`ftyp`, `moov`, with the edit lists that put the AAC priming before t = 0). Boxes are
relocatable (`default_base_moof`); what differs between the in-memory files is patched here: the
fragment sequence numbers (`mfhd`) continue across flushes and each track's decode time (`tfdt`)
is moved from "first packet of this flush" to the track's time since the start of the file.

A process killed at any moment leaves a file holding every flushed packet: each flush is one
`write()` of whole boxes followed by a flush to the OS (a kill mid-write leaves at most one partial
box at the end, which readers stop at).
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av

__all__ = ["FragmentFile"]

_INIT_OPTIONS = {"movflags": "empty_moov+delay_moov+default_base_moof", "use_editlist": "1"}
_NEXT_OPTIONS = {"movflags": "empty_moov+default_base_moof", "use_editlist": "0"}


def _boxes(data: bytes | bytearray, start: int = 0, end: int | None = None):
    """Yield `(type, offset, size)` of the ISO-BMFF boxes in `data[start:end]` (32-bit sizes)."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, i)
        if size < 8:
            raise ValueError(f"mp4: unexpected box size {size} at byte {i}")
        yield kind.decode("latin-1"), i, size
        i += size


class FragmentFile:
    """Write packets of `streams` (encoder-owning PyAV streams of a never-muxed container) to
    `file` (opened "wb" without buffering, named `path` in messages; closed by `close()`).

    `add(packet)` queues an encoded packet; `flush()` puts every queued packet on disk.
    Decode times are kept per track relative to the first packet ever flushed on that track.
    """

    def __init__(self, file: BinaryIO, path: Path, streams: list) -> None:
        self.path = path
        self._streams = streams
        self._pending: list[av.Packet] = []
        self._origin: dict[int, Fraction] = {}  # track index -> first dts (s) of the file
        self._sequence = 0
        self._file = file
        self._error: OSError | None = None

    def add(self, packets: list) -> None:
        self._pending.extend(packets)

    def flush(self, final: bool = False) -> None:
        """Append every pending packet to the file (no-op when none).

        The first flush waits (unless `final`) until every stream has a packet, so the init boxes
        record where each track starts."""
        if not self._pending:
            return
        first = not self._origin
        if first and not final and {id(p.stream) for p in self._pending} != {id(s) for s in self._streams}:
            return
        firsts: dict[int, Fraction] = {}
        for p in self._pending:
            idx = self._streams.index(p.stream)
            firsts.setdefault(idx, p.dts * p.time_base)
        for idx, t in firsts.items():
            self._origin.setdefault(idx, t)
        buf = io.BytesIO()
        seg = av.open(buf, "w", format="mp4", options=dict(_INIT_OPTIONS if first else _NEXT_OPTIONS))
        copies = [seg.add_stream_from_template(s, opaque=True) for s in self._streams]
        for p in self._pending:
            p.stream = copies[self._streams.index(p.stream)]
            seg.mux(p)
        seg.close()
        self._pending = []
        data = bytearray(buf.getvalue())
        self._seg_base: dict[int, int] = {}
        timescales = self._timescales(data)
        out = bytearray()
        for kind, off, size in _boxes(data):
            if kind in ("ftyp", "moov") and first:
                out += data[off:off + size]
            elif kind == "moof":
                out += self._patch_moof(data[off:off + size], timescales, firsts, first)
            elif kind == "mdat":
                out += data[off:off + size]
        self._write_all(out)

    def _write_all(self, data: bytearray) -> None:
        """Write every byte (the file is unbuffered: a short write is retried, an error raised at once).
        After a failure (disk full, I/O error) the file takes no more writes; what is on disk stays
        readable up to its last whole fragment."""
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view):]
        except OSError as exc:
            self._error = OSError(exc.errno, f"video: cannot write {self.path}: {exc.strerror or exc}")
            raise self._error from exc

    @staticmethod
    def _timescales(data: bytearray) -> dict[int, int]:
        """track_ID -> media timescale, read from moov/trak/{tkhd, mdia/mdhd}."""
        scales: dict[int, int] = {}
        for kind, off, size in _boxes(data):
            if kind != "moov":
                continue
            for k2, o2, s2 in _boxes(data, off + 8, off + size):
                if k2 != "trak":
                    continue
                track_id = timescale = None
                for k3, o3, s3 in _boxes(data, o2 + 8, o2 + s2):
                    if k3 == "tkhd":
                        v = data[o3 + 8]
                        track_id = struct.unpack_from(">I", data, o3 + 12 + (16 if v == 1 else 8))[0]
                    elif k3 == "mdia":
                        for k4, o4, _ in _boxes(data, o3 + 8, o3 + s3):
                            if k4 == "mdhd":
                                v = data[o4 + 8]
                                timescale = struct.unpack_from(">I", data, o4 + 12 + (16 if v == 1 else 8))[0]
                if track_id is not None and timescale:
                    scales[track_id] = timescale
        return scales

    def _patch_moof(self, moof: bytearray, timescales: dict[int, int], firsts: dict[int, Fraction],
                    first: bool) -> bytearray:
        """Continue the sequence number; in later flushes set each track's `tfdt` to its time since
        the file's first packet on that track (keeping the spacing of several fragments of one flush)."""
        for kind, off, size in _boxes(moof, 8):
            if kind == "mfhd":
                self._sequence += 1
                struct.pack_into(">I", moof, off + 12, self._sequence)
            elif kind == "traf" and not first:
                track_id = None
                for k2, o2, _ in _boxes(moof, off + 8, off + size):
                    if k2 == "tfhd":
                        track_id = struct.unpack_from(">I", moof, o2 + 12)[0]
                    elif k2 == "tfdt" and track_id is not None:
                        idx = track_id - 1  # the muxer numbers tracks 1.. in stream order
                        fmt = ">Q" if moof[o2 + 8] == 1 else ">I"
                        t = struct.unpack_from(fmt, moof, o2 + 12)[0]
                        base = self._seg_base.setdefault(track_id, t)
                        shift = round((firsts[idx] - self._origin[idx]) * timescales[track_id])
                        struct.pack_into(fmt, moof, o2 + 12, t - base + shift)
        return moof

    def close(self) -> None:
        """Write what is pending (unless a write failed before) and close the file."""
        try:
            if self._error is None:
                self.flush(final=True)
        finally:
            self._file.close()


