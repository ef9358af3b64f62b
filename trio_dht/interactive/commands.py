"""dhtnode's prompt commands, sans-IO: a line becomes a :class:`Command`; what the node answers becomes the
lines dhtnode prints.

Keys are read as dhtnode reads them: 40 hex digits are the key itself; any other word is hashed
(``InfoHash.get``), and the hash is announced with ``Using h(WORD) = HEX``. A value is printed as OpenDHT
prints one: ``Value[id:HEX data(text/plain):"text"]`` for text, ``Value[id:HEX data:HEX]`` for bytes (``N
bytes`` from 1024 bytes on), ``signed (vSEQ)`` or ``encrypted`` before the data. Control characters in a
value's text are escaped (``\\x1b``), so what a peer stored cannot drive the terminal. Durations are
printed as dhtnode prints them: three significant digits, in us, ms or s.

Two departures from dhtnode: ``q`` quits (dhtnode's ``q`` is a field-index query, which this node does not
serve), and ``p``/``pp``/``s`` store the rest of the line (dhtnode stores its first word only).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from trio_dht.api import NodeInfo
from trio_dht.infohash import InfoHash
from trio_dht.value import Value

TEXT_PLAIN = "text/plain"
CERTIFICATE_TYPE = 8
"""OpenDHT's value type of a certificate (printed as ``Certificate``)."""
HEX_UP_TO = 1024
"""Values with fewer bytes than this are printed in hex; larger ones as their size. A text value is printed up
to this many bytes, then its size (a stranger's 64 KiB value is one line of at most ~4 KB escaped)."""
BANNER_HINT = " (type 'h' or 'help' for a list of possible commands)"

HELP = """\
OpenDHT command line interface (CLI)
Possible commands:
  h, help    Print this help message.
  x, q, quit Quit the program.

Node information:
  ll         Print basic information and stats about the current node.
  ls [key]   Print basic information about current search(es).
  ld [key]   Print basic information about currenty stored values on this node (or key).
  la         Print the public addresses reported by other nodes.
  lr         Print the full current routing table of this node.

Operations on the DHT:
  g <key>               Get values at <key>.
  l <key>               Listen for value changes at <key>.
  cl <key> <token>      Cancel listen for <token> and <key>.
  p <key> <str>         Put string value at <key>.
  pp <key> <str>        Put string value at <key> (persistent version).
  cpp <key> <id>        Cancel persistent put operation for <key> and value <id>.
  s <key> <str>         Put string value at <key>, signed with our generated private key.
  e <key> <dest> <str>  Put string value at <key>, encrypted for <dest> with its public key (if found).
"""


class Op(enum.Enum):
    HELP = "help"
    QUIT = "quit"
    INFO = "ll"
    SEARCHES = "ls"
    STORAGE = "ld"
    ADDRESSES = "la"
    ROUTING = "lr"
    GET = "g"
    LISTEN = "l"
    CANCEL_LISTEN = "cl"
    PUT = "p"
    PUT_PERMANENT = "pp"
    CANCEL_PUT = "cpp"
    PUT_SIGNED = "s"
    PUT_ENCRYPTED = "e"


_WORDS = {
    "h": Op.HELP, "help": Op.HELP, "x": Op.QUIT, "q": Op.QUIT, "exit": Op.QUIT, "quit": Op.QUIT,
    **{op.value: op for op in Op if op not in (Op.HELP, Op.QUIT)},
}  # fmt: skip
_KEYED = {Op.GET, Op.LISTEN, Op.CANCEL_LISTEN, Op.PUT, Op.PUT_PERMANENT, Op.CANCEL_PUT, Op.PUT_SIGNED}
_KEYED |= {Op.PUT_ENCRYPTED}
_FILTERED = {Op.SEARCHES, Op.STORAGE}
ONE_SHOT = {Op.GET, Op.PUT, Op.PUT_PERMANENT, Op.PUT_SIGNED, Op.PUT_ENCRYPTED}
"""The commands that run as a task and end with one line (the others answer at once)."""


class CommandError(ValueError):
    """A line that is no command; its message is what to print."""


@dataclass(frozen=True, slots=True)
class Command:
    """One parsed line. ``hashed``: the word ``key`` was hashed from (None when given in hex)."""

    op: Op
    key: InfoHash | None = None
    hashed: str | None = None
    text: str = ""
    number: int = 0
    """A listen token (``cl``) or a value id (``cpp``)."""
    to: str = ""
    """The recipient of ``e``: a key id in hex."""


def parse_key(word: str) -> tuple[InfoHash, str | None]:
    """The key ``word`` names, and the word if it was hashed (dhtnode's rule)."""
    if len(word) == 40:
        try:
            key = InfoHash.from_hex(word)
        except ValueError:
            pass
        else:
            if key:
                return key, None
    return InfoHash.get(word), word


def parse(line: str) -> Command | None:
    """The command on ``line``; None for an empty line. Raises :class:`CommandError`."""
    words = line.split(maxsplit=1)
    if not words:
        return None
    op = _WORDS.get(words[0])
    if op is None:
        raise CommandError(f"Unknown command: {words[0]}\n{BANNER_HINT}")
    rest = words[1] if len(words) > 1 else ""
    if op in _FILTERED:
        if not rest.strip():
            return Command(op)
        key, hashed = parse_key(rest.split()[0])
        return Command(op, key, hashed)
    if op not in _KEYED:
        return Command(op)
    parts = rest.split(maxsplit=1)
    if not parts:
        raise CommandError("Syntax error: invalid InfoHash.")
    key, hashed = parse_key(parts[0])
    rest = parts[1].strip() if len(parts) > 1 else ""
    if op is Op.CANCEL_LISTEN:
        if not rest.isdecimal():
            raise CommandError("Syntax: cl [key] [token]")
        return Command(op, key, hashed, number=int(rest))
    if op is Op.CANCEL_PUT:
        try:
            number = int(rest, 16)
        except ValueError:
            raise CommandError("Syntax: cpp [key] [value id in hex]") from None
        return Command(op, key, hashed, number=number)
    if op is Op.PUT_ENCRYPTED:
        to, _, text = rest.partition(" ")
        if not to:
            raise CommandError("Syntax: e <key> <dest> <str>")
        return Command(op, key, hashed, text=text.strip(), to=to)
    return Command(op, key, hashed, text=rest)


def using_line(command: Command) -> str | None:
    """``Using h(WORD) = HEX`` when the command's key was hashed from a word."""
    if command.hashed is None or command.key is None:
        return None
    return f"Using h({command.hashed}) = {command.key.hex()}"


# -- what the node answers ----------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """A duration as dhtnode prints it: ``599 us``, ``1.25 ms``, ``1.21 s``, ``2.5 min``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("min", 60.0), ("h", 3600.0)):
        if seconds < scale * (1000 if unit in ("us", "ms") else 60):
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 86400:.3g} days"


def _escaped(text: str) -> str:
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def format_value(value: Value) -> str:
    """A value as OpenDHT prints it."""
    parts = [f"Value[id:{value.id:x} "]
    if value.cypher:
        parts.append("encrypted ")
    elif value.signature:
        parts.append(f"signed (v{value.seq}) ")
        if value.recipient:
            parts.append("decrypted ")
    if not value.cypher:
        if value.type == CERTIFICATE_TYPE:
            parts.append("Certificate")
        elif value.utype == TEXT_PLAIN:
            text = _escaped(value.data[:HEX_UP_TO].decode("utf-8", "replace"))
            more = f"... ({len(value.data)} bytes)" if len(value.data) > HEX_UP_TO else ""
            parts.append(f'data(text/plain):"{text}"{more}')
        else:
            parts.append(f"data({_escaped(value.utype)}):" if value.utype else "data:")
            data = value.data
            parts.append(data.hex() if len(data) < HEX_UP_TO else f"{len(data)} bytes")
    parts.append("]")
    return "".join(parts)


def text_value(text: str, value_id: int) -> Value:
    """The value ``p``, ``pp``, ``s`` and ``e`` put: ``text`` as ``text/plain``, type 0."""
    return Value(data=text.encode("utf-8"), id=value_id, utype=TEXT_PLAIN)


def get_found(values: Iterable[Value], elapsed: float, total: int) -> list[str]:
    """A batch of values a get found; ``total`` counts them with those printed before."""
    values = list(values)
    head = f"Get: found {len(values)} value(s) after {format_duration(elapsed)} (total {total})"
    return [head, *(f"\t{format_value(v)}" for v in values)]


def get_done(ok: bool, elapsed: float, total: int) -> str:
    return f"Get: {'completed' if ok else 'failure'}, took {format_duration(elapsed)} (total {total})"


def put_done(ok: bool, elapsed: float, value_id: int, what: str = "Put") -> str:
    """The end of ``p``/``pp`` (``what`` "Put"), ``s`` ("Put signed") or ``e`` ("Put encrypted")."""
    outcome = "success" if ok else "failure"
    return f"{what}: {outcome}, took {format_duration(elapsed)}. Value ID: {value_id:x}"


def listen_found(values: Iterable[Value], expired: bool, total: int) -> list[str]:
    values = list(values)
    head = f"Listen: found {len(values)} values{' expired' if expired else ''} (total {total})"
    return [head, *(f"\t{format_value(v)}" for v in values)]


def listening(token: int) -> str:
    return f"Listening, token: {token}"


def banner(node_id: InfoHash, port: int) -> list[str]:
    """What the prompt prints first (as dhtnode's start)."""
    return [f"OpenDHT node {node_id.hex()} running on port {port}", BANNER_HINT, ""]


def node_info(info: NodeInfo, ongoing: int) -> list[str]:
    """``ll``: the node's id and port, its operations, storage, and nodes per family."""
    lines = [
        f"OpenDHT node {info.node_id.hex()} running on port {info.bound_port}",
        f"{ongoing} ongoing operations",
        f"Storage has {info.storage_values} values, using {info.storage_size // 1024} KB",
    ]
    for name, stats in (("IPv4", info.ipv4), ("IPv6", info.ipv6)):
        lines += [
            f"{name} stats:",
            f"Known nodes: {stats.good} good, {stats.dubious} dubious, {stats.incoming} incoming.",
            f"{stats.searches} searches, {stats.cached} total cached nodes",
            "",
        ]
    return lines


@dataclass(frozen=True, slots=True)
class KeyStorage:
    """What ``ld`` prints of one key: its stored values (with their sizes) and remote listeners."""

    key: InfoHash
    values: list[tuple[Value, int]]
    listeners: int = 0


def storage_log(keys: Iterable[KeyStorage]) -> list[str]:
    """``ld``: each key's values, then the totals."""
    lines: list[str] = []
    count = values = size = 0
    for entry in keys:
        key_size = sum(s for _, s in entry.values)
        held = f"{len(entry.values)} values ({key_size} bytes)"
        lines.append(f"Storage {entry.key.hex()} {entry.listeners} list., {held}")
        lines += [f"\t{format_value(v)}" for v, _ in entry.values]
        lines.append("")
        count, values, size = count + 1, values + len(entry.values), size + key_size
    return [*lines, "", f"Total {count} storages, {values} values ({size} bytes)", ""]


@dataclass(frozen=True, slots=True)
class SearchSummary:
    """What ``ls`` prints of one key the node searches: a get in progress, and/or our listen on it."""

    key: InfoHash
    getting: bool = False
    listeners: int = 0
    """Our listens on the key (``l``, the proxy's, the push service's)."""
    nodes: tuple[str, ...] = ()
    """The storing nodes our listen is open on (``host:port``)."""


def searches_log(searches: Iterable[SearchSummary]) -> list[str]:
    lines = []
    total = 0
    for search in searches:
        total += 1
        doing = []
        if search.getting:
            doing.append("get in progress")
        if search.listeners:
            doing.append(f"{search.listeners} listens open on {len(search.nodes)} nodes")
        lines.append(f"Search {search.key.hex()} {', '.join(doing) or 'idle'}")
        lines += [f"    {node}" for node in search.nodes]
        lines.append("")
    return [*lines, f"Total: {total} searches.", ""]


def addresses(public: Iterable[str]) -> list[str]:
    """``la``: the public addresses other nodes reported."""
    return ["Reported public addresses:", *public]


@dataclass(frozen=True, slots=True)
class RoutingNode:
    node_id: InfoHash
    address: str
    heard_ago: float
    """Seconds since it was last heard from (infinite: never)."""
    state: str
    """``good``, ``dubious`` or ``expired``."""


@dataclass(frozen=True, slots=True)
class RoutingBucket:
    first: InfoHash
    changed_ago: float
    nodes: list[RoutingNode]


def _ago(seconds: float) -> str:
    return f"{format_duration(seconds)} ago" if seconds < float("inf") else "never"


def routing_log(family: str, buckets: Iterable[RoutingBucket]) -> list[str]:
    """``lr``: one family's buckets (the first id of each) and their nodes."""
    lines = [f"{family} routing table:"]
    for bucket in buckets:
        lines.append(f"{bucket.first.hex()} count: {len(bucket.nodes)} updated: {_ago(bucket.changed_ago)}")
        lines += [
            f"    Node {n.node_id.hex()} {n.address} updated: {_ago(n.heard_ago)} [{n.state}]"
            for n in bucket.nodes
        ]
    return [*lines, ""]
