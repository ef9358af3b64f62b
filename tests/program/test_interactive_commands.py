"""dhtnode's prompt commands (``trio_dht.interactive.commands``): lines parsed, answers formatted as
dhtnode 2.4.12 prints them (the expected lines are dhtnode's own, seen on its prompt)."""

from __future__ import annotations

import pytest
from peers import parse_value_line

from trio_dht.api import FamilyStats, NodeInfo
from trio_dht.infohash import InfoHash
from trio_dht.interactive.commands import (
    HELP,
    Command,
    CommandError,
    KeyStorage,
    Op,
    RoutingBucket,
    RoutingNode,
    SearchSummary,
    banner,
    format_duration,
    format_value,
    get_done,
    get_found,
    listen_found,
    listening,
    node_info,
    parse,
    parse_key,
    put_done,
    routing_log,
    searches_log,
    storage_log,
    text_value,
    using_line,
)
from trio_dht.value import Value

FOO = InfoHash.from_hex("0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33")  # InfoHash.get("foo")


# -- parsing -------------------------------------------------------------------------------------------------


def test_a_word_is_hashed_and_announced() -> None:
    command = parse("g foo")
    assert command == Command(Op.GET, FOO, "foo")
    assert using_line(command) == "Using h(foo) = 0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33"


def test_forty_hex_digits_are_the_key() -> None:
    command = parse("g 0BEEC7B5EA3F0FDBC95D0DD47F3C5BC275DA8A33")
    assert command == Command(Op.GET, FOO, None)
    assert using_line(command) is None


def test_a_zero_or_malformed_hex_key_is_hashed_as_dhtnode_does() -> None:
    assert parse_key("0" * 40) == (InfoHash.get("0" * 40), "0" * 40)
    assert parse_key("z" * 40) == (InfoHash.get("z" * 40), "z" * 40)
    assert parse_key("abc") == (InfoHash.get("abc"), "abc")


@pytest.mark.parametrize("word", ["h", "help"])
def test_help(word: str) -> None:
    assert parse(word) == Command(Op.HELP)
    assert "  g <key>               Get values at <key>." in HELP.splitlines()


@pytest.mark.parametrize("word", ["x", "q", "quit", "exit", "  x  "])
def test_quit(word: str) -> None:
    assert parse(word) == Command(Op.QUIT)


def test_empty_lines_are_nothing() -> None:
    assert parse("") is None
    assert parse("   \t") is None


def test_unknown_command_prints_dhtnode_s_two_lines() -> None:
    with pytest.raises(CommandError) as raised:
        parse("zz 1 2")
    assert str(raised.value).split("\n") == [
        "Unknown command: zz",
        " (type 'h' or 'help' for a list of possible commands)",
    ]


@pytest.mark.parametrize("line", ["g", "l  ", "p", "cl", "pp"])
def test_a_command_without_its_key_is_a_syntax_error(line: str) -> None:
    with pytest.raises(CommandError, match=r"^Syntax error: invalid InfoHash\.$"):
        parse(line)


def test_put_takes_the_rest_of_the_line() -> None:
    assert parse("p foo hello  world ") == Command(Op.PUT, FOO, "foo", text="hello  world")
    assert parse("p foo") == Command(Op.PUT, FOO, "foo", text="")
    assert parse("pp foo bar").op is Op.PUT_PERMANENT
    assert parse("s foo bar") == Command(Op.PUT_SIGNED, FOO, "foo", text="bar")


def test_encrypted_put_names_its_recipient() -> None:
    assert parse("e foo 00ff hi there") == Command(Op.PUT_ENCRYPTED, FOO, "foo", text="hi there", to="00ff")
    with pytest.raises(CommandError, match="Syntax: e"):
        parse("e foo")


def test_cancel_listen_takes_a_decimal_token() -> None:
    assert parse("cl foo 12") == Command(Op.CANCEL_LISTEN, FOO, "foo", number=12)
    with pytest.raises(CommandError, match=r"Syntax: cl \[key\] \[token\]"):
        parse("cl foo x")


def test_cancel_put_takes_a_hex_value_id() -> None:
    assert parse("cpp foo e67a1b2bdfcf758e") == Command(Op.CANCEL_PUT, FOO, "foo", number=0xE67A1B2BDFCF758E)
    with pytest.raises(CommandError, match="Syntax: cpp"):
        parse("cpp foo")


@pytest.mark.parametrize("op", ["ls", "ld"])
def test_node_logs_take_an_optional_key(op: str) -> None:
    assert parse(op) == Command(Op(op))
    assert parse(f"{op} foo") == Command(Op(op), FOO, "foo")


def test_other_commands() -> None:
    assert parse("ll") == Command(Op.INFO)
    assert parse("la") == Command(Op.ADDRESSES)
    assert parse("l foo") == Command(Op.LISTEN, FOO, "foo")


# -- formatting ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (599e-6, "599 us"),
        (37.5e-6, "37.5 us"),
        (1.25e-3, "1.25 ms"),
        (1.9e-3, "1.9 ms"),
        (1.21, "1.21 s"),
        (150.0, "2.5 min"),
        (7200.0, "2 h"),
        (-1.25e-3, "-1.25 ms"),
    ],
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_values_print_as_opendht_prints_them() -> None:
    assert format_value(text_value("bar", 0xE67A1B2BDFCF758E)) == (
        'Value[id:e67a1b2bdfcf758e data(text/plain):"bar"]'
    )
    assert format_value(Value(data=b"\x01\xff", id=0x1F)) == "Value[id:1f data:01ff]"
    assert format_value(Value(data=b"{}", id=2, utype="application/json")) == (
        "Value[id:2 data(application/json):7b7d]"
    )
    assert format_value(Value(data=bytes(1024), id=3)) == "Value[id:3 data:1024 bytes]"
    assert format_value(Value(data=b"x", id=4, utype="text/plain", signature=b"s", seq=2)) == (
        'Value[id:4 signed (v2) data(text/plain):"x"]'
    )
    assert format_value(Value(id=5, cypher=b"c")) == "Value[id:5 encrypted ]"
    assert format_value(Value(data=b"cert", id=6, type=8)) == "Value[id:6 Certificate]"


def test_value_lines_parse_as_dhtnode_s() -> None:
    """The test suite's parser of dhtnode's value lines reads ours back."""
    line = "\t" + format_value(text_value("bar", 0xE67A1B2BDFCF758E))
    parsed = parse_value_line(line)
    assert parsed is not None
    assert (parsed["id"], parsed["data"], parsed["utype"]) == (0xE67A1B2BDFCF758E, b"bar", "text/plain")
    parsed = parse_value_line(format_value(Value(data=b"\x01\xff", id=0x1F)))
    assert parsed is not None and parsed["data"] == b"\x01\xff"


def test_control_characters_of_a_value_are_escaped() -> None:
    text = format_value(text_value("\x1b[2Jgone\n", 1))
    assert "\x1b" not in text and "\n" not in text
    assert text == 'Value[id:1 data(text/plain):"\\x1b[2Jgone\\n"]'


def test_get_lines() -> None:
    values = [text_value("bar", 0xE67A1B2BDFCF758E)]
    assert get_found(values, 117e-6, 1) == [
        "Get: found 1 value(s) after 117 us (total 1)",
        '\tValue[id:e67a1b2bdfcf758e data(text/plain):"bar"]',
    ]
    assert get_done(True, 649e-6, 1) == "Get: completed, took 649 us (total 1)"
    assert get_done(False, 2.0, 0) == "Get: failure, took 2 s (total 0)"


def test_put_lines() -> None:
    assert put_done(True, 599e-6, 0xE67A1B2BDFCF758E) == (
        "Put: success, took 599 us. Value ID: e67a1b2bdfcf758e"
    )
    assert put_done(False, 1.25e-3, 0xA, "Put signed") == "Put signed: failure, took 1.25 ms. Value ID: a"


def test_listen_lines() -> None:
    values = [text_value("baz", 0xBFFC1F4C66FC1102)]
    assert listen_found(values, False, 2) == [
        "Listen: found 1 values (total 2)",
        '\tValue[id:bffc1f4c66fc1102 data(text/plain):"baz"]',
    ]
    assert listen_found(values, True, 3)[0] == "Listen: found 1 values expired (total 3)"
    assert listening(2) == "Listening, token: 2"


def test_banner() -> None:
    assert banner(FOO, 4222) == [
        f"OpenDHT node {FOO.hex()} running on port 4222",
        " (type 'h' or 'help' for a list of possible commands)",
        "",
    ]


def test_node_info() -> None:
    info = NodeInfo(FOO, ipv4=FamilyStats(good=1), storage_values=3, storage_size=5000, bound_port=4401)
    assert node_info(info, 1) == [
        f"OpenDHT node {FOO.hex()} running on port 4401",
        "1 ongoing operations",
        "Storage has 3 values, using 4 KB",
        "IPv4 stats:",
        "Known nodes: 1 good, 0 dubious, 0 incoming.",
        "0 searches, 0 total cached nodes",
        "",
        "IPv6 stats:",
        "Known nodes: 0 good, 0 dubious, 0 incoming.",
        "0 searches, 0 total cached nodes",
        "",
    ]


def test_storage_log() -> None:
    value = text_value("bar", 0xE67A1B2BDFCF758E)
    assert storage_log([KeyStorage(FOO, [(value, 13)], listeners=2)]) == [
        f"Storage {FOO.hex()} 2 list., 1 values (13 bytes)",
        '\tValue[id:e67a1b2bdfcf758e data(text/plain):"bar"]',
        "",
        "",
        "Total 1 storages, 1 values (13 bytes)",
        "",
    ]
    assert storage_log([]) == ["", "Total 0 storages, 0 values (0 bytes)", ""]


def test_searches_log() -> None:
    searches = [SearchSummary(FOO, getting=True, listeners=1, nodes=("127.0.0.1:4402",))]
    assert searches_log(searches) == [
        f"Search {FOO.hex()} get in progress, 1 listens open on 1 nodes",
        "    127.0.0.1:4402",
        "",
        "Total: 1 searches.",
        "",
    ]


def test_routing_log() -> None:
    assert parse("lr") == Command(Op.ROUTING)
    node = RoutingNode(FOO, "127.0.0.1:4402", 1.22, "good")
    assert routing_log("IPv4", [RoutingBucket(InfoHash(), 1.22, [node])]) == [
        "IPv4 routing table:",
        "0000000000000000000000000000000000000000 count: 1 updated: 1.22 s ago",
        f"    Node {FOO.hex()} 127.0.0.1:4402 updated: 1.22 s ago [good]",
        "",
    ]
    assert routing_log("IPv6", [RoutingBucket(InfoHash(), float("inf"), [])]) == [
        "IPv6 routing table:",
        "0000000000000000000000000000000000000000 count: 0 updated: never",
        "",
    ]
