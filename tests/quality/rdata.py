"""A small reader for R's lazy-load databases (.rdx index + .rdb blobs),
enough to pull character vectors out of a CRAN package's data/ without R.

Format (R Internals, "Serialization formats" and "Lazy loading"): each blob
is a 4-byte big-endian uncompressed length followed by a zlib stream; the
stream is an XDR serialization ("X\\n", version 2 or 3) of one R object. The
.rdx is a gzip file (as saveRDS writes) of one serialization of a list
(variables, references, compressed), `variables` mapping each name to
c(offset, length) in the .rdb.
"""
import gzip
import struct
import zlib

# SEXP types used here (R's Rinternals.h / serialize.c)
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
ALTREP_SXP, ATTRLISTSXP, EMPTYENV_SXP, BASEENV_SXP = 238, 239, 242, 241
GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 253, 254, 255
NA_INT = -(2**31)


class RObject:
    """An R value: `value` (list of Python values, or None for NULL) and `attrs` (dict)."""

    def __init__(self, sexptype, value, attrs=None):
        self.type, self.value, self.attrs = sexptype, value, attrs or {}

    def names(self):
        n = self.attrs.get("names")
        return n.value if isinstance(n, RObject) else None

    def as_dict(self):
        """A named list as {name: element}."""
        names = self.names()
        if names is None:
            raise ValueError("R object has no names attribute")
        return dict(zip(names, self.value))


class Unserializer:
    def __init__(self, data):
        self.b, self.i, self.refs = data, 0, []

    def _take(self, n):
        if self.i + n > len(self.b):
            raise ValueError(f"truncated R serialization at byte {self.i} (+{n} of {len(self.b)})")
        out = self.b[self.i:self.i + n]
        self.i += n
        return out

    def int(self):
        return struct.unpack(">i", self._take(4))[0]

    def header(self):
        fmt = self._take(2)
        if fmt != b"X\n":
            raise ValueError(f"only XDR serializations are supported, got format {fmt!r}")
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unknown serialization version {version}")

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t == NILVALUE_SXP:
            return None
        if t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP):
            return RObject(t, None)
        if t == REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == SYMSXP:
            sym = RObject(SYMSXP, self.item().value)  # the name, a CHARSXP
            self.refs.append(sym)
            return sym
        if t in (LISTSXP, ATTRLISTSXP):
            return self._pairlist(has_attr, has_tag)
        if t == CHARSXP:
            n = self.int()
            return RObject(CHARSXP, None if n == -1 else self._take(n).decode("utf-8", "replace"))
        if t == ALTREP_SXP:
            self.item()  # class info
            state = self.item()
            attr = self.item()
            obj = RObject(t, state.value if isinstance(state, RObject) else state)
            obj.attrs = _pairlist_dict(attr)
            return obj
        if t in (LGLSXP, INTSXP):
            n = self._length()
            vals = list(struct.unpack(f">{n}i", self._take(4 * n)))
            value = [None if v == NA_INT else v for v in vals]
        elif t == REALSXP:
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif t == STRSXP:
            value = [self.item().value for _ in range(self._length())]
        elif t == VECSXP:
            value = [self.item() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported SEXP type {t} at byte {self.i}")
        obj = RObject(t, value)
        if has_attr:
            obj.attrs = _pairlist_dict(self.item())
        return obj

    def _length(self):
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def _pairlist(self, has_attr, has_tag):
        attrs = _pairlist_dict(self.item()) if has_attr else {}
        tag = self.item() if has_tag else None
        car = self.item()
        cdr = self.item()
        cell = RObject(LISTSXP, [(tag.value if tag is not None else None, car)], attrs)
        if isinstance(cdr, RObject) and cdr.type == LISTSXP:
            cell.value += cdr.value
        return cell


def _pairlist_dict(p):
    if p is None:
        return {}
    return {k: v for k, v in p.value}


def unserialize(data):
    u = Unserializer(data)
    u.header()
    return u.item()


def _blob(raw):
    """A lazy-load blob: 4-byte big-endian length, then zlib."""
    (n,) = struct.unpack(">I", raw[:4])
    out = zlib.decompress(raw[4:])
    if len(out) != n:
        raise ValueError(f"blob length {len(out)} != header {n}")
    return out


def read_lazyload(rdx_bytes, rdb_bytes):
    """{variable name: RObject} for every variable of a lazy-load database."""
    index = unserialize(gzip.decompress(rdx_bytes) if rdx_bytes[:2] == b"\x1f\x8b" else _blob(rdx_bytes)).as_dict()
    if index.get("compressed") is not None and index["compressed"].value not in ([True], [1]):
        raise ValueError(f"only zlib-compressed databases are supported (compressed = {index['compressed'].value})")
    out = {}
    for name, pos in index["variables"].as_dict().items():
        off, ln = (int(x) for x in pos.value)
        out[name] = unserialize(_blob(rdb_bytes[off:off + ln]))
    return out
