"""Where the frames of encapsulated pixel data lie, found as pydicom's decoders find them, without copying the data.

Two readers count them: `io.dicom` refuses an image whose pixel data holds fewer frames than its Number of Frames (a
decoder decodes what is there, without a word), and ingest refuses a file whose frames are missing or lack their
end-of-image marker. One rule serves both, so that a file ingest pools is a file the pool builder reads; the decoders
`io.dicom` calls besides pydicom's (imagecodecs, the reduced JPEG 2000 decode) take their frames by it too, so that
frame N is the same frame whichever decodes it. Item headers are read in place: a frame is known by the positions of
its first and last fragments, its bytes are joined only for a frame a decoder asks for (`frame_bytes`), an offset
table's entries are read as they are needed (a hostile table may hold millions), and a walk stops once the frames asked
for are found. Within `frames_split_once`, the items of a pixel data value are split into frames once, and every look at
its frames takes them from that split (ingest looks at a file's frames several times: `frames_split_once`).
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple, TypeVar

import pydicom

_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_EOI = b"\xff\xd9"  # pydicom ends a frame at a fragment with this in its last _EOI_WINDOW bytes
_EOI_WINDOW = 10
_TAIL_STEP = 4096  # trailing padding is read back this many bytes at a time
# The splits of a `frames_split_once` block: id of the pixel data -> (the pixel data, what was found of it by key)
_SHARED: ContextVar[dict[int, tuple[bytes, dict]] | None] = ContextVar("medtriage_frames_split_once", default=None)
T = TypeVar("T")


class Span(NamedTuple):
    """Bytes start:stop of the pixel data: the value of a frame's last fragment."""

    start: int
    stop: int


class Frame(NamedTuple):
    """A frame's first and last fragments (the same span for a frame of one fragment); the fragments between them, in
    item order, are the rest of it."""

    first: Span
    last: Span


class MalformedItems(ValueError):
    """Encapsulated pixel data whose items cannot be walked (pydicom's decoders refuse them too)."""


def claimed_frames(ds: pydicom.Dataset, claimed: int) -> Iterator[Span]:
    """The last fragment of each of the first `claimed` frames of `ds`'s encapsulated pixel data, as pydicom's decoders
    locate the frames: by the Extended Offset Table where they use one, else by the Basic Offset Table, else one
    fragment per frame (fragments ending in an end-of-image marker where there are more fragments than frames).
    Fewer fragments than frames, without a table, give the fragments there are. Raises MalformedItems."""
    return frame_ends(ds.PixelData, claimed, extended_offsets(ds))


def located_frames(ds: pydicom.Dataset, claimed: int) -> Iterator[Frame]:
    """`claimed_frames`, each frame with its first fragment too: what `frame_bytes` joins."""
    return frames_in(ds.PixelData, claimed, extended_offsets(ds))


def misplaced_basic_entry(ds: pydicom.Dataset, claimed: int) -> int | None:
    """The first of the first `claimed` frames whose Basic Offset Table entry is not where the frame's first item lies
    in item order (None: each is, or the table is not what locates the frames). pydicom's decoders read the frames of a
    whole image in item order but a frame asked for alone from its entry on (`pydicom.encaps.get_frame`): only where
    each entry is where its frame starts do the two take the same bytes for it. Raises MalformedItems."""
    data = ds.PixelData
    count, entry, first = _basic_offsets(data)
    if not count or extended_offsets(ds) is not None:
        return None
    for index, frame in enumerate(frames_in(data, min(count, claimed))):
        starts = frame.first.start - 8 - first if frame.first != Span(first, first) else None  # None: no fragments
        fits = entry(index) == starts if starts is not None else index < count - 1 and entry(index) == entry(index + 1)
        if not fits:
            return index
    return None


def extended_offsets(ds: pydicom.Dataset) -> tuple[bytes, bytes] | None:
    """The Extended Offset Table and its lengths, where the decoders go by them: both present, as many bytes in each
    (else they ignore the table)."""
    if 0x7FE00001 not in ds or 0x7FE00002 not in ds:
        return None
    table, lengths = ds.ExtendedOffsetTable or b"", ds.ExtendedOffsetTableLengths or b""
    return (table, lengths) if len(table) == len(lengths) else None


def frame_ends(data: bytes, claimed: int, extended: tuple[bytes, bytes] | None = None) -> Iterator[Span]:
    """`claimed_frames` for the encapsulated pixel data `data` and an Extended Offset Table, where one is used."""
    return (frame.last for frame in frames_in(data, claimed, extended))


def frames_in(data: bytes, claimed: int, extended: tuple[bytes, bytes] | None = None) -> Iterator[Frame]:
    """`located_frames` for the encapsulated pixel data `data` and an Extended Offset Table, where one is used."""
    if claimed < 1:
        return
    basic_count, basic_entry, first = _basic_offsets(data)
    if extended is not None:
        yield from itertools.islice(_split(data, ("extended", *extended), lambda: _by_extended_table(data, first, *extended)), claimed)
    elif basic_count:  # the first frames of all the table's: the same frames, found by the same walk as far as they go
        every = _split(data, ("basic",), lambda: _by_basic_table(data, first, basic_count, basic_entry, basic_count))
        yield from itertools.islice(every, claimed)
    else:
        yield from _split(data, ("fragments", claimed), lambda: _by_fragments(data, first, claimed))


def frame_bytes(data: bytes, frame: Frame) -> bytes | bytearray:
    """The bytes of `frame` as a decoder is handed them: its fragments' values joined, in one copy of that frame alone
    (its size is counted first: a frame may hold a million empty fragments). A frame of one span is that span (an
    Extended Offset Table's entry, which need not end where an item does)."""
    if frame.first == frame.last:
        return data[frame.first.start : frame.first.stop]
    joined = bytearray(sum(stop - start for start, stop in _fragments_of(data, frame)))
    view, filled = memoryview(data), 0
    for start, stop in _fragments_of(data, frame):
        joined[filled : filled + stop - start] = view[start:stop]
        filled += stop - start
    return joined


def frame_length(data: bytes, frame: Frame) -> int:
    """How many bytes `frame_bytes` would hand a decoder for `frame`, counted without copying them (a frame may be
    gigabytes)."""
    if frame.first == frame.last:
        return frame.first.stop - frame.first.start
    return sum(stop - start for start, stop in _fragments_of(data, frame))


def _fragments_of(data: bytes, frame: Frame) -> Iterator[Span]:
    for fragment in _fragments(data, frame.first.start - 8):  # from the first fragment's item header
        yield fragment
        if fragment.start >= frame.last.start:
            return


def ends_with(data: bytes, span: Span, marker: bytes) -> bool:
    """Whether the fragment `span`, less the zero bytes that pad it, ends with `marker`; read back from its end a step at
    a time, so that neither the fragment nor its padding is copied whole."""
    stop = span.stop
    while stop > span.start:
        start = max(span.start, stop - _TAIL_STEP)
        kept = len(data[start:stop].rstrip(b"\0"))
        if kept:
            end = start + kept
            return data[max(span.start, end - len(marker)) : end] == marker
        stop = start
    return False


def _item_header(length: int) -> bytes:
    return struct.pack("<HHL", _ITEM >> 16, _ITEM & 0xFFFF, length)


def item_end(data: bytes, value: Span) -> int:
    """Where the item whose value starts at `value.start` ends, as its header says (within the data)."""
    (length,) = struct.unpack_from("<L", data, value.start - 4)
    return min(value.start + length, len(data))


def _basic_offsets(data: bytes) -> tuple[int, Callable[[int], int], int]:
    """The Basic Offset Table's entry count, a reader of its entries (read when asked for: a table may hold millions)
    and where the item after it starts."""
    if len(data) < 8:
        raise MalformedItems("the pixel data ends before its Basic Offset Table item")
    group, element, length = struct.unpack_from("<HHL", data, 0)
    if group << 16 | element != _ITEM:
        raise MalformedItems(f"the pixel data starts with the tag ({group:04X},{element:04X}), not the Basic Offset Table item")
    if length % 4 or 8 + length > len(data):
        raise MalformedItems(f"a Basic Offset Table item of {length} bytes (a multiple of 4, within the pixel data)")
    return length // 4, lambda index: struct.unpack_from("<L", data, 8 + 4 * index)[0], 8 + length


def _fragments(data: bytes, position: int) -> Iterator[Span]:
    """The fragments from `position` on, as pydicom reads them: up to a sequence delimiter or the end of the data, the
    last one cut short where the data ends."""
    end = len(data)
    while position + 4 <= end:
        group, element = struct.unpack_from("<HH", data, position)
        if group << 16 | element == _SEQUENCE_END:
            return
        if group << 16 | element != _ITEM:
            raise MalformedItems(f"an item with the tag ({group:04X},{element:04X}) at byte {position} of the pixel data")
        if position + 8 > end:
            raise MalformedItems(f"the pixel data ends inside the item header at byte {position}")
        (length,) = struct.unpack_from("<L", data, position + 4)
        if length == 0xFFFFFFFF:
            raise MalformedItems(f"an item of undefined length at byte {position} of the pixel data")
        yield Span(position + 8, min(position + 8 + length, end))
        position += 8 + length


def _by_extended_table(data: bytes, first: int, table: bytes, lengths: bytes) -> Iterator[Frame]:
    """One fragment per frame, at each entry's offset from the first item after the Basic Offset Table."""
    for index in range(min(len(table), len(lengths)) // 8):
        (offset,), (length,) = struct.unpack_from("<Q", table, 8 * index), struct.unpack_from("<Q", lengths, 8 * index)
        start = min(first + offset + 8, len(data))  # past the item header; a decoder reads nothing beyond the data
        span = Span(start, min(start + length, len(data)))
        yield Frame(span, span)


def _by_basic_table(data: bytes, first: int, count: int, entry: Callable[[int], int], claimed: int) -> Iterator[Frame]:
    """Fragments join the frame whose entry they start at or after, in item order (pydicom's reading: the last frame
    takes every fragment left)."""
    index, offset, begins, last = 0, 0, None, Span(first, first)
    for fragment in _fragments(data, first):
        if index < count - 1 and offset >= entry(index + 1):
            yield Frame(begins or last, last)  # a frame without fragments: the empty span
            index, begins = index + 1, None
            if index == claimed:
                return
        begins, last = begins or fragment, fragment
        offset += fragment.stop - fragment.start + 8
    yield Frame(begins or last, last)


def _by_fragments(data: bytes, first: int, claimed: int) -> Iterator[Frame]:
    """Without an offset table: one frame of every fragment, one fragment per frame, or (more fragments than frames) a
    frame ends at each fragment with an end-of-image marker near its end, and any fragments after the last make one."""
    if claimed == 1:
        fragments = _fragments(data, first)
        begins = next(fragments, Span(first, first))
        last = deque(fragments, maxlen=1)
        yield Frame(begins, last[0] if last else begins)
        return
    some = list(itertools.islice(_fragments(data, first), claimed + 1))
    if len(some) <= claimed:
        yield from (Frame(fragment, fragment) for fragment in some)
        return
    yield from itertools.islice(_split(data, ("end markers",), lambda: _at_end_markers(data, first)), claimed)


def _at_end_markers(data: bytes, first: int) -> Iterator[Frame]:
    """A frame ends at each fragment with an end-of-image marker near its end; fragments after the last make one."""
    begins, last = None, None
    for fragment in _fragments(data, first):
        begins, last = begins or fragment, fragment
        if _EOI in data[max(fragment.start, fragment.stop - _EOI_WINDOW) : fragment.stop]:
            yield Frame(begins, fragment)
            begins = None
    if begins is not None:
        yield Frame(begins, last)


def every_frame(ds: pydicom.Dataset, claimed: int, fragment_a_frame: bool = False) -> list[Frame]:
    """Every frame `ds`'s encapsulated pixel data holds, each of its fragments in one: the `claimed` frames as
    `located_frames` finds them and, where no offset table bounds them, the fragments after those split as decoders
    split frames past Number of Frames; so more frames than `claimed` are frames past Number of Frames, which no
    decoder reads. `fragment_a_frame`: the syntax puts each frame in one fragment of its own (RLE, Encapsulated
    Uncompressed: PS3.5 A.4.2, A.4.11), so without a table each fragment past the `claimed` is a frame (it has no
    end-of-image marker to be split at). One frame claimed, decoders join every fragment into it, and so does this:
    what lies past its end is then the frame's own checks' to find. An Extended Offset Table must give each frame one whole fragment (PS3.5 A.4),
    else the items could not be rebuilt around changed frames. Raises MalformedItems."""
    data, extended = ds.PixelData, extended_offsets(ds)
    count, _, first = _basic_offsets(data)
    if extended is not None:
        frames = list(frames_in(data, len(extended[0]) // 8, extended))
        shared(data, ("one fragment each", *extended), lambda: _one_fragment_each(data, first, frames))
        return frames
    if count:
        return list(frames_in(data, count))
    if claimed > 1 and shared(data, ("more fragments than", claimed), lambda: _more_fragments(data, first, claimed)):
        if fragment_a_frame:
            return list(_split(data, ("each fragment",), lambda: (Frame(fragment, fragment) for fragment in _fragments(data, first))))
        return list(_split(data, ("end markers",), lambda: _at_end_markers(data, first)))  # frames end at end-of-image markers
    return list(frames_in(data, claimed))


def _more_fragments(data: bytes, first: int, count: int) -> bool:
    """Whether the items from `first` on hold more than `count` fragments (read up to one more)."""
    return any(True for _ in itertools.islice(_fragments(data, first), count, None))


def _one_fragment_each(data: bytes, first: int, frames: list[Frame]) -> None:
    fragments = list(_fragments(data, first))
    whole = len(fragments) == len(frames) and all(
        frame.first.start == fragment.start and frame.first.stop <= fragment.stop for frame, fragment in zip(frames, fragments)
    )
    if not whole:
        raise MalformedItems("the Extended Offset Table does not give each frame one whole fragment, in item order")


def reencapsulated(
    data: bytes, frames: list[Frame], replaced: dict[int, bytes], extended: bool
) -> tuple[bytes, tuple[bytes, bytes] | None]:
    """The pixel data `data` (its frames `frames`, from `every_frame`) with frame i as one fragment holding
    `replaced[i]`, padded to an even length; the other frames' items are copied as they are, and a frame without
    fragments stays without them (its entry the next frame's). The Basic Offset Table, where it has entries, and the
    Extended Offset Table, where `extended`, are rebuilt to point at each frame's first item (the latter returned with
    its lengths)."""
    count, _, first = _basic_offsets(data)
    items, offsets, lengths, position = [], [], [], 0
    for index, frame in enumerate(frames):
        if index in replaced:  # the padded length, as pydicom's encapsulate_extended gives it
            value = replaced[index] + b"\0" * (len(replaced[index]) % 2)
            item, length = _item_header(len(value)) + value, len(value)
        elif frame.first.start == first:  # a frame without fragments: its span stands in, it has no item to copy
            item, length = b"", 0
        else:  # whole items: an Extended Offset Table's length may leave out the padding
            item, length = data[frame.first.start - 8 : item_end(data, frame.last)], frame.first.stop - frame.first.start
        items.append(item)
        offsets.append(position)
        lengths.append(length)
        position += len(item)
    table = struct.pack(f"<{len(offsets)}L", *offsets) if count else b""
    pixel_data = b"".join([_item_header(len(table)), table, *items])
    if not extended:
        return pixel_data, None
    return pixel_data, (struct.pack(f"<{len(offsets)}Q", *offsets), struct.pack(f"<{len(lengths)}Q", *lengths))


# ---------------------------------------------------------------- one split for every look (`frames_split_once`)


@contextmanager
def frames_split_once() -> Iterator[None]:
    """Within the block, the items of a pixel data value are split into frames once, and every look at its frames
    (`every_frame`, `claimed_frames`, `located_frames`, `misplaced_basic_entry`, `frames_in`) takes them from that
    split. Ingest looks at a compressed file's frames several times (frames past Number of Frames, frames that cannot
    be walked, frames missing, then the cleaning of stream metadata), and each look would split the items again. A
    split is found lazily and replayed as found, what it raised included: each look gets the frames, and the error at
    the place, that a split of its own would give, and takes the split no further than its own would go. Only `bytes`
    is shared (a value that cannot change), by identity, and only until the block ends, which lets go of it."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared(data: bytes, key: tuple, compute: Callable[[], T]) -> T:
    """`compute()`, found once for `data` and `key` within a `frames_split_once` block and given again after (what it
    raised is raised again); outside one, or for a value that may change (not `bytes`), found each time. `key` names
    what `compute` finds of `data` and everything else it depends on (a frame count, an offset table)."""
    found = _found(data, key)
    if found is None:
        return compute()
    if key not in found:
        try:
            found[key] = (compute(), None)
        except Exception as err:  # raised again to each later look, as a look of its own would raise it
            found[key] = (None, err)
    value, raised = found[key]
    if raised is not None:
        raise raised
    return value


def _split(data: bytes, key: tuple, items: Callable[[], Iterator[T]]) -> Iterator[T]:
    """`items()`, shared within a `frames_split_once` block as `shared` shares a value, but taken up lazily: a look
    walks the split only as far as it asks, and one after it goes on from there."""
    found = _found(data, key)
    if found is None:
        return items()
    replay = found.get(key)
    if replay is None:
        replay = found[key] = _Replay(items())
    return iter(replay)


def _found(data: bytes, key: tuple) -> dict | None:
    """What the block found of `data`; None outside a block, and for a value or key that may change (an offset table
    held in a bytearray)."""
    splits = _SHARED.get()
    if splits is None or type(data) is not bytes or not all(isinstance(part, (str, int, bytes)) or part is None for part in key):
        return None
    held = splits.get(id(data))
    if held is None or held[0] is not data:  # held: its id is no other value's while the block lasts
        held = splits[id(data)] = (data, {})
    return held[1]


class _Replay(Iterable[T]):
    """The items of an iterator kept as they are first asked for, and handed again to each later reader, up to its end
    or to what it raised, raised again there (an interrupt too: the iterator it came through is over)."""

    def __init__(self, items: Iterator[T]) -> None:
        self._items: Iterator[T] | None = items
        self._kept: list[T] = []
        self._raised: BaseException | None = None

    def __iter__(self) -> Iterator[T]:
        index = 0
        while True:
            if index < len(self._kept):
                yield self._kept[index]
                index += 1
            elif self._raised is not None:
                raise self._raised
            elif self._items is None:
                return
            else:
                try:
                    self._kept.append(next(self._items))
                except StopIteration:
                    self._items = None
                except BaseException as err:  # the iterator is over: each later reader meets this where it came
                    self._items, self._raised = None, err
                    raise
