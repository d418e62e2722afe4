"""A token's shape (``trust.bundle.is_valid_token``): one line of printable ASCII without
spaces, checked on every request a node serves."""

from __future__ import annotations

from meshscale.trust.bundle import MAX_TOKEN_LENGTH, is_valid_token


def test_every_character_is_judged_as_printable_ascii_without_spaces() -> None:
    for code in range(0x300):
        c = chr(code)
        assert is_valid_token(f"ab{c}cd") is (33 <= code < 127), repr(c)


def test_length_type_and_emptiness() -> None:
    assert is_valid_token("x" * MAX_TOKEN_LENGTH)
    assert not is_valid_token("x" * (MAX_TOKEN_LENGTH + 1))
    assert not is_valid_token("")
    assert not is_valid_token(b"token")
    assert not is_valid_token(None)
    assert not is_valid_token("line\nbreak")
