"""The upstream's HTTP/1.1: one request per connection, its answer's body pushed to a sink.

Why not aiohttp's client for the answers (bench/RESULTS.md, "Hot path, fourth pass"): there every
upstream chunk went through aiohttp's client protocol, its parser's callbacks and a
``StreamReader``, then woke the producer task through five coroutine frames, and the chunk
was only then decoded.  Here ``data_received`` takes the chunked framing off and hands the body
to the sink in the same callback, and the sink (relay/upstream/client.py) decodes the events and
runs the generation's step right there: no buffer, no future, no task switch per chunk.

A connection is never reused: an answer ends by closing it (closing is what stops the billing,
and draining a cancelled answer would keep the upstream generating), so there is no pool to
keep, only a bound on how many are open at once (``--pool-limit``).  ``aiohttp`` still serves
the upstream's ``/models`` (rare, not streamed).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import zlib
from dataclasses import dataclass
from typing import Final, Protocol, cast

import aiohappyeyeballs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

#: The most the status line and headers may take (aiohttp's own bound is 8190 bytes per line).
MAX_HEAD: Final = 64 * 1024
#: The most a chunk-size line (with its extensions) or a trailer line may take.
MAX_LINE: Final = 8 * 1024
#: Decompressed bytes handed on at a time: a small compressed body cannot become one huge piece.
INFLATE_PIECE: Final = 256 * 1024
HAPPY_EYEBALLS_DELAY: Final = 0.25

_STATUS = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: (.*))?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]{1,18}")

# Where the reader is in the answer.
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _LENGTH, _TO_CLOSE, _DONE = range(8)


class ProtocolError(ConnectionError):
    """The upstream's bytes are not an HTTP/1.1 answer this client can read (or they stopped)."""


class ConnectFailed(Exception):
    """No connection: ``reason`` is fit for a client (no address, no host name)."""

    def __init__(self, reason: str, *, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]


class BodySink(Protocol):
    def body(self, data: bytes) -> None:
        """Some of the body (decoded: no chunk framing, no content coding)."""

    def end(self, exc: Exception | None) -> None:
        """The body is complete (None) or cannot be (the connection broke, the framing is wrong)."""


class Answer(asyncio.Protocol):
    """One answer on its own connection: ``head`` resolves with the status and headers, then the
    body goes to the sink given to ``deliver`` (what arrives before is held for it)."""

    __slots__ = ("_early", "_ending", "_finished", "_inflate", "_release", "_remaining", "_rest", "_sink", "_state",
                 "head", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, release: asyncio.Semaphore | None) -> None:
        self.head: asyncio.Future[Head] = loop.create_future()
        self._finished = False
        self.transport: asyncio.Transport | None = None
        self._release = release
        self._state = _HEAD
        self._rest = b""
        self._remaining = 0
        self._inflate: zlib._Decompress | None = None
        self._sink: BodySink | None = None
        self._early: list[bytes] = []
        self._ending: list[Exception | None] = []  # the end, once known, until a sink takes it

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._state == _DONE:
            return
        try:
            self._feed(data)
        except Exception as exc:  # a framing error, or the sink's own failure: the answer's end
            self._finish(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost decides what the end means

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release is not None:
            self._release.release()
            self._release = None
        if self._state == _TO_CLOSE and exc is None:
            try:
                self._flush()
            except Exception as failure:  # a corrupt compressed tail, or the sink's own failure
                self._finish(failure)
                return
            self._finish(None)
        elif self._state != _DONE:
            self._finish(ProtocolError("the upstream connection closed before the answer was complete"))

    # -- the owner's side ------------------------------------------------------------------

    def deliver(self, sink: BodySink) -> None:
        """Hand the body to ``sink`` from now on, starting with what has arrived already."""
        self._sink = sink
        early, self._early = self._early, []
        for data in early:
            if self._sink is not sink:
                return
            sink.body(data)
        if self._ending and self._sink is sink:
            sink.end(self._ending.pop())

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection; the sink hears no more."""
        self._sink = None
        self._early = []
        self._ending = []
        self._finished = True
        self._state = _DONE
        if not self.head.done():
            self.head.cancel()
        if self.transport is not None:
            self.transport.close()

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body, to its end (for an error body or a whole JSON answer)."""
        collect = _Collect(asyncio.get_running_loop(), limit)
        self.deliver(collect)
        return await collect.done

    # -- parsing ---------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
            self._rest = b""
        out: list[bytes] = []
        try:
            pos = self._unframe(data, out)
        except ProtocolError:
            if out:
                self._pass_on(b"".join(out))  # what came before the break, then the break
            raise
        if pos < len(data) and self._state != _DONE:
            self._rest = data[pos:]
        if out:
            # One delivery per read, however many chunks it held: one decode, one batch of events.
            self._pass_on(out[0] if len(out) == 1 else b"".join(out))
        if self._state == _DONE:
            self._flush()
            self._finish(None)

    def _unframe(self, data: bytes, out: list[bytes]) -> int:
        """Take the framing off ``data`` into ``out``; where the unread rest begins."""
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA or state == _LENGTH:
                take = min(self._remaining, end - pos)
                out.append(data if take == end else data[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    if state == _DATA:
                        self._state = _DATA_END
                    else:
                        self._state = _DONE
                        break
            elif state == _SIZE:
                nl = _line_end(data, pos, "chunk-size")
                if nl < 0:
                    break
                size = data[pos:nl].split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise ProtocolError("the upstream sent a malformed chunk size")
                pos = nl + 2
                self._remaining = int(size, 16)
                self._state = _DATA if self._remaining else _TRAILER
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("the upstream's chunk was longer than its size")
                pos += 2
                self._state = _SIZE
            elif state == _TO_CLOSE:
                out.append(data if pos == 0 else data[pos:])
                pos = end
            elif state == _TRAILER:
                nl = _line_end(data, pos, "trailer")
                if nl < 0:
                    break
                if nl == pos:
                    self._state = _DONE
                    pos = nl + 2
                    break
                pos = nl + 2
            elif state == _HEAD:
                cut = data.find(b"\r\n\r\n", pos)
                if (cut if cut >= 0 else end) - pos > MAX_HEAD:
                    raise ProtocolError("the upstream's headers are too large")
                if cut < 0:
                    break
                self._parse_head(data[pos:cut])
                pos = cut + 4
            else:  # _DONE: bytes after the answer are not ours to read
                break
        return pos

    def _parse_head(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        status = _STATUS.fullmatch(lines[0])
        if status is None:
            raise ProtocolError("the upstream's answer is not HTTP/1.1")
        code = int(status[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise ProtocolError("the upstream sent a malformed header line")
            headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
        if code < 200:
            if code == 101:
                raise ProtocolError("the upstream switched protocols")
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._state = self._framing(code, headers)
        coding = headers.get("Content-Encoding", "").strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            # 32 + 15: the zlib or the gzip header, whichever the body starts with.
            self._inflate = zlib.decompressobj(47)
        elif coding not in ("", "identity"):
            raise ProtocolError(f"the upstream sent a content coding the relay does not read ({coding[:40]})")
        self.head.set_result(Head(code, (status[2] or b"").decode("latin-1"), CIMultiDictProxy(headers)))

    def _framing(self, code: int, headers: CIMultiDict[str]) -> int:
        codings = headers.getall("Transfer-Encoding", [])
        if codings:
            last = ",".join(codings).rsplit(",", 1)[-1].strip().lower()
            # RFC 9112 6.3: chunked last means chunked; anything else runs to the connection's close.
            return _SIZE if last == "chunked" else _TO_CLOSE
        lengths = {v.strip() for v in headers.getall("Content-Length", [])}
        if lengths:
            if len(lengths) != 1 or not _DIGITS.fullmatch(next(iter(lengths))):
                raise ProtocolError("the upstream sent an invalid Content-Length")
            self._remaining = int(lengths.pop())
            return _LENGTH if self._remaining else _DONE
        if code in (204, 304):
            return _DONE
        return _TO_CLOSE

    def _pass_on(self, data: bytes) -> None:
        inflate = self._inflate
        if inflate is None:
            self._give(data)
            return
        try:
            while data:
                piece = inflate.decompress(data, INFLATE_PIECE)
                data = inflate.unconsumed_tail
                if piece:
                    self._give(piece)
        except zlib.error:
            raise ProtocolError("the upstream's compressed body is corrupt") from None

    def _flush(self) -> None:
        if self._inflate is not None:
            try:
                rest = self._inflate.flush()
            except zlib.error:
                raise ProtocolError("the upstream's compressed body is corrupt") from None
            self._inflate = None
            if rest:
                self._give(rest)

    def _give(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._early.append(data)
        else:
            sink.body(data)

    def _finish(self, exc: Exception | None) -> None:
        """The answer's one end: to the head's waiter if it is still waiting, else to the sink."""
        if self._finished:
            return
        self._finished = True
        self._state = _DONE
        if not self.head.done():
            self.head.set_exception(exc if exc is not None else ProtocolError("the upstream sent no answer"))
        elif self._sink is not None:
            self._sink.end(exc)
        else:
            self._ending.append(exc)
        if self.transport is not None:
            self.transport.close()


def _line_end(data: bytes, pos: int, what: str) -> int:
    """Where the line starting at ``pos`` ends (its CRLF), -1 while incomplete; too long is an error."""
    nl = data.find(b"\r\n", pos, pos + MAX_LINE + 2)
    if nl < 0 and len(data) - pos > MAX_LINE:
        raise ProtocolError(f"the upstream sent a {what} line that is too long")
    return nl


class _Collect:
    """A sink that keeps up to ``limit`` bytes and resolves ``done`` at the end or at the bound."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.done: asyncio.Future[bytes] = loop.create_future()
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def body(self, data: bytes) -> None:
        if self.done.done():
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self._limit:
            self.done.set_result(b"".join(self._parts)[:self._limit])

    def end(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(b"".join(self._parts))


class Connector:
    """Opens one connection per answer, at most ``limit`` at once (0: no bound)."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None
        self._tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            # The system's trust store (SSL_CERT_FILE / SSL_CERT_DIR are honoured), hostname checked.
            self._tls = ssl.create_default_context()
        return self._tls

    async def send(self, url: URL, head: bytes, body: bytes, connect_timeout: float) -> Answer:
        """Connect to ``url``'s host, write the request; the answer (its head still on its way)."""
        loop = asyncio.get_running_loop()
        host, port = url.raw_host or "", url.port or 80
        tls = self._tls_context() if url.scheme == "https" else None
        slots = self._slots
        acquired = False
        try:
            async with asyncio.timeout(connect_timeout):
                if slots is not None:
                    await slots.acquire()
                    acquired = True
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                                                               interleave=1)
                try:
                    _, answer = await loop.create_connection(
                        lambda: Answer(loop, slots), sock=sock, ssl=tls,
                        server_hostname=host if tls is not None else None)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            if acquired and slots is not None:
                slots.release()
            raise ConnectFailed(f"could not connect to the upstream within the connect timeout "
                                f"({connect_timeout:g} s)", timeout=True) from None
        except socket.gaierror:
            if acquired and slots is not None:
                slots.release()
            raise ConnectFailed("could not connect to the upstream (its host name did not resolve)") from None
        except ssl.SSLError as exc:
            if acquired and slots is not None:
                slots.release()
            # The library's reason (CERTIFICATE_VERIFY_FAILED, ...) names no host or address.
            raise ConnectFailed(f"could not connect to the upstream (TLS: {exc.reason or 'handshake failed'})") \
                from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: aiohappyeyeballs' mixed failures
            if acquired and slots is not None:
                slots.release()
            raise ConnectFailed(f"could not connect to the upstream ({_os_reason(exc)})") from None
        except BaseException:
            if acquired and slots is not None:
                slots.release()
            raise
        assert isinstance(answer, Answer) and answer.transport is not None
        answer.transport.writelines((head, body))
        return answer


def _os_reason(exc: Exception) -> str:
    """From the errno, not the message: asyncio's text names the upstream's address."""
    errno = getattr(exc, "errno", None)
    return os.strerror(errno) if isinstance(errno, int) and errno > 0 else type(exc).__name__


def request_head(method: str, url: URL, headers: dict[str, str], length: int) -> bytes:
    """The request line and headers; ``headers`` were checked for CR, LF and NUL when configured."""
    lines = [f"{method} {url.raw_path_qs or '/'} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    # Nothing is reused (see the module's docstring): the upstream may let go at once too.
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
