"""The one byte-size grammar (shared.units) and the one file hash (shared.hashing)."""
import hashlib

import pytest

from shared.errors import ByteSizeError, EoedgeError
from shared.hashing import sha256_blocks, sha256_file
from shared.units import MAX_BYTES, format_bytes, parse_bytes


@pytest.mark.parametrize("text, n", [
    ("5MB", 5_000_000), ("5MiB", 5_242_880), ("5mb", 5_000_000), ("5 MiB", 5_242_880),
    ("300KB", 300_000), ("300kB", 300_000), ("300KiB", 307_200), ("1GB", 10 ** 9),
    ("1GiB", 1 << 30), ("5000000", 5_000_000), ("5000B", 5000), ("0", 0), ("1.5MiB", 1_572_864),
    ("1.5MB", 1_500_000), (" 42 ", 42), (1234, 1234),
])
def test_sizes_in_the_grammar(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text, written", [("5M", "5MB"), ("5K", "5KB"), ("5G", "5GB"),
                                           ("5m", "5MB"), ("1.5M", "1.5MB"), ("5Mi", "5MB")])
def test_a_bare_prefix_is_ambiguous_and_refused(text, written):
    with pytest.raises(ByteSizeError) as exc:
        parse_bytes(text)
    message = str(exc.value)
    assert repr(text) in message and "ambiguous" in message
    assert written in message and written.replace("B", "iB") in message


@pytest.mark.parametrize("value, says", [
    ("lots", "not a size"), ("-5MB", "must not be negative"), ("5XB", "unknown unit 'XB'"),
    ("1.5B", "not a whole number of bytes"), ("0.1KiB", "not a whole number of bytes"),
    ("5 000", "not a size"), ("", "not a size"), (-1, "must not be negative"),
    ("2000000GB", "over the largest size"), (MAX_BYTES + 1, "over the largest size"),
    (True, "expected a number of bytes"), (5.0, "expected a number of bytes"),
])
def test_garbage_negative_and_absurd_sizes_are_refused_naming_the_value(value, says):
    with pytest.raises(ByteSizeError, match=says) as exc:
        parse_bytes(value)
    assert repr(value) in str(exc.value)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, EoedgeError)
    assert exc.value.code == "invalid_size"


def test_format_bytes_is_unambiguous_iec():
    assert format_bytes(512) == "512 B"
    assert format_bytes(10240) == "10.00 KiB"
    assert format_bytes(5_000_000) == "4.77 MiB"
    assert format_bytes(1 << 30) == "1.00 GiB"
    assert parse_bytes(format_bytes(3 << 20).replace(".00 ", "")) == 3 << 20   # round trip


def test_sha256_of_a_file_and_of_a_stream(tmp_path):
    data = bytes(range(256)) * 5000                       # over one read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=1000) == expected
    assert sha256_blocks([data[:7], data[7:]]) == expected
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
