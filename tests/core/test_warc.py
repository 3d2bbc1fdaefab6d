"""core/warc: deterministic writing, reading with counted problems, charset decoding."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from llmctl.core.warc import Page, WarcReport, decode_html, read_warc, write_warc

PAGES = [
    Page(f"https://example.org/{i}", f"<html><body><p>page {i}</p></body></html>".encode())
    for i in range(4)
]


def read(path: Path) -> tuple[list, WarcReport]:
    report = WarcReport()
    return list(read_warc(path, report)), report


@pytest.mark.parametrize("name", ["a.warc.gz", "a.warc"])
def test_write_then_read_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert write_warc(path, PAGES) == 4
    recs, report = read(path)
    assert [r.url for r in recs] == [p.url for p in PAGES]
    assert [r.body for r in recs] == [p.body for p in PAGES]
    assert all(
        r.status == 200 and r.content_type == "text/html" and r.charset == "utf-8" for r in recs
    )
    assert all(r.problem is None and r.is_html for r in recs)
    assert len({r.id for r in recs}) == 4
    assert recs[0].id.startswith("urn:uuid:")
    assert report.records == 5
    assert dict(report.skipped) == {"warcinfo": 1}
    assert report.problems == []


def test_writing_is_deterministic_and_warcio_reads_it(tmp_path: Path) -> None:
    for d in ("1", "2"):
        (tmp_path / d).mkdir()
        write_warc(tmp_path / d / "a.warc.gz", PAGES)
    data = (tmp_path / "1" / "a.warc.gz").read_bytes()
    assert data == (tmp_path / "2" / "a.warc.gz").read_bytes()
    warcio = pytest.importorskip("warcio.archiveiterator")  # an independent reader agrees
    recs = [
        (r.rec_type, r.rec_headers.get_header("WARC-Target-URI"), r.content_stream().read())
        for r in warcio.ArchiveIterator(io.BytesIO(data))
    ]
    assert recs[0][0] == "warcinfo"
    assert [(u, b) for _, u, b in recs[1:]] == [(p.url, p.body) for p in PAGES]


def test_gzip_is_detected_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    write_warc(tmp_path / "a.warc.gz", PAGES)
    misnamed = tmp_path / "b.warc"
    misnamed.write_bytes((tmp_path / "a.warc.gz").read_bytes())
    recs, report = read(misnamed)
    assert len(recs) == 4
    assert report.problems == []


def test_truncated_gzip_keeps_the_readable_records_and_says_where(tmp_path: Path) -> None:
    full = tmp_path / "full.warc.gz"
    write_warc(full, PAGES)
    data = full.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) - 30])  # inside the last record's gzip member
    recs, report = read(cut)
    good = [r for r in recs if r.problem is None]
    assert [r.url for r in good] == [p.url for p in PAGES[: len(good)]]
    assert len(good) >= 3
    assert len(report.problems) == 1
    assert "truncated at byte" in report.problems[0]
    assert str(cut) in report.problems[0]


def test_truncated_plain_warc_marks_the_partial_record(tmp_path: Path) -> None:
    full = tmp_path / "full.warc"
    write_warc(full, PAGES)
    cut = tmp_path / "cut.warc"
    cut.write_bytes(full.read_bytes()[:-40])
    recs, _ = read(cut)
    assert [r.problem for r in recs] == [None, None, None, "truncated"]
    assert "bytes" in recs[-1].detail


def test_broken_http_headers_are_counted_and_reading_goes_on(tmp_path: Path) -> None:
    bad = [
        Page("https://bad.example/1", http=b"this is not http\r\n\r\n<p>x</p>"),
        Page("https://bad.example/2", http=b"HTTP/1.1 2x0 WHAT\r\nContent-Type text/html\r\n"),
    ]
    path = tmp_path / "mixed.warc.gz"
    write_warc(path, [PAGES[0], *bad, PAGES[1]])
    recs, report = read(path)
    assert [r.problem for r in recs] == [None, "bad_http_headers", "bad_http_headers", None]
    assert recs[3].body == PAGES[1].body
    assert report.problems == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"GET / HTTP/1.1\r\nthis is no archive\r\n\r\n", "is corrupt at its start"),
    ],
)
def test_empty_or_garbage_file_is_a_file_problem(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "x.warc"
    path.write_bytes(content)
    recs, report = read(path)
    assert recs == []
    assert len(report.problems) == 1
    assert message in report.problems[0]


def test_non_html_and_error_pages_are_read_as_such(tmp_path: Path) -> None:
    path = tmp_path / "a.warc.gz"
    write_warc(
        path,
        [
            Page("https://x.example/logo.png", b"\x89PNG\r\n", content_type="image/png"),
            Page("https://x.example/missing", b"<html>gone</html>", status=404),
        ],
    )
    recs, _ = read(path)
    assert (recs[0].content_type, recs[0].is_html) == ("image/png", False)
    assert (recs[1].status, recs[1].is_html) == (404, True)


CAFE = "Caf\u00e9 cr\u00e8me \u2014 \u201cna\u00efve\u201d"


def test_declared_charset_in_http_header_wins() -> None:
    body = f"<html><body><p>{CAFE}</p></body></html>".encode("cp1252")
    text, how = decode_html(body, "windows-1252")
    assert CAFE in text
    assert how == "http:cp1252"


def test_meta_charset_then_whatwg_mapping() -> None:
    # ISO-8859-1 is decoded as windows-1252, as browsers do: 0x93/0x94 are curly quotes there.
    body = f'<html><head><meta charset="ISO-8859-1"></head><body>{CAFE}</body></html>'.encode(
        "cp1252"
    )
    text, how = decode_html(body)
    assert CAFE in text
    assert how == "meta:cp1252"
    http_equiv = b'<meta http-equiv="Content-Type" content="text/html; charset=shift_jis">'
    body = http_equiv + "\u65e5\u672c\u8a9e".encode("shift_jis")
    text, how = decode_html(body)
    assert "\u65e5\u672c\u8a9e" in text
    assert how == "meta:shift_jis"


def test_undeclared_bad_bytes_become_replacement_characters() -> None:
    text, how = decode_html(b"<p>ok \xff\xfe bad \xe9 bytes</p>")
    assert how == "default:utf-8"
    assert "\ufffd" in text
    assert text.startswith("<p>ok")
    text, how = decode_html(b"<p>x</p>", "no-such-charset")  # unknown label: fall through
    assert how == "default:utf-8"


def test_byte_order_mark_comes_first() -> None:
    text, how = decode_html("\ufeff<p>\u00e9</p>".encode("utf-16-le"), "windows-1252")
    assert text == "<p>\u00e9</p>"
    assert how == "bom:utf-16-le"
