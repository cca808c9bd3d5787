"""Finishing a constrained answer inside its token budget: the shortest way found from the grammar's
current state to a complete answer (a "closing plan"), so that the loop can steer a run to finish.

A plan is a list of token ids that the grammar accepts one after another and after which it is
complete (EOS allowed). It is found by a small bounded beam search over llguidance's own matcher:
from each state, the tokens the grammar forces (``compute_ff_tokens``) are one move; otherwise the
moves are the allowed "closer" tokens (``"``, ``}``, ``]``, ``0``, ``null``, ... in that order of
preference) and a few more allowed tokens (lowest ids: byte tokens on byte-fallback vocabularies),
checked against the mask. For JSON the beam ranks states by how many brackets and strings are still
open in the text so far (``json_depth``). The grammar stays the judge: every plan token was accepted
by a copy of the run's matcher, and the loop still applies the mask when it emits it.
"""
from __future__ import annotations

import numpy as np

CLOSERS = ('"', "}", "]", '"}', '"]', "}}", "]}", "}]", "0", '""', "{}", "[]", "null", ", ", ",", ": ", ":",
           " ", "1", "a")
BEAM = 6  # states kept per depth
DEPTH = 48  # moves tried before giving up (then no plan: the run may end with "length")
EXTRA = 12  # allowed non-closer tokens tried per state: the lowest id for each first byte

JsonScan = tuple  # (open brackets, in a string, after a backslash, text outside strings and numbers,
#                    the open string's or number's length so far, in a number)
JSON_START: JsonScan = ("", False, False, b"", 0, False)
NUMBER = frozenset(b"0123456789.eE+-")


def json_scan(st: JsonScan, data: bytes) -> JsonScan:
    """The scan state after ``data`` (JSON text, possibly cut anywhere). Two states with the same scan
    differ only in the contents of strings and numbers (a number is one ``0`` in the outside text)."""
    stack, in_str, esc, outside, n, in_num = st
    out = bytearray(outside)
    for ch in data:
        if in_str:
            n += 1
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:
                in_str, n = False, 0
                out.append(ch)
            continue
        in_num = in_num and ch in NUMBER
        if in_num:
            n += 1
            continue
        in_num = ch in NUMBER
        n = int(in_num)
        out.append(0x30 if in_num else ch)
        if ch == 0x22:
            in_str = True
        elif ch in (0x7B, 0x5B):  # { [
            stack += chr(ch)
        elif ch in (0x7D, 0x5D) and stack:
            stack = stack[:-1]
    return stack, in_str, esc, bytes(out), n, in_num


def rebase(st: JsonScan) -> JsonScan:
    """``st`` with its outside text dropped (a search counts text from its own start)."""
    return st[:3] + (b"",) + st[4:]


def json_depth(st: JsonScan) -> int:
    return len(st[0]) + int(st[1]) + int(st[2])


class Planner:
    """Closing plans for one tokenizer (``closer_ids`` found once) and one constraint kind."""

    def __init__(self, token_bytes, n_vocab: int, eos_id: int, json: bool):
        self.token_bytes, self.n_vocab, self.eos_id, self.json = token_bytes, n_vocab, eos_id, json
        data = [token_bytes(i) for i in range(n_vocab)]
        by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(data):
            if i != eos_id:
                by_bytes.setdefault(b, i)
        self.closers = [by_bytes[c.encode()] for c in CLOSERS if c.encode() in by_bytes]
        self.first_byte = np.array([b[0] if b else -1 for b in data], dtype=np.int16)

    def _moves(self, matcher) -> tuple[bool, list[list[int]]]:
        """(whether the grammar forces the one move, the moves to try from this state)."""
        ff = matcher.compute_ff_tokens()
        if ff:
            return True, [list(ff)]
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = bits[: self.n_vocab].astype(bool)
        if self.eos_id < allowed.size:
            allowed[self.eos_id] = False
        moves = [[t] for t in self.closers if allowed[t]]
        others = np.flatnonzero(allowed)
        others = others[~np.isin(others, self.closers)]
        _, first = np.unique(self.first_byte[others], return_index=True)  # one token per first byte
        return False, moves + [[int(t)] for t in np.sort(others[first])[:EXTRA]]

    def plan(self, matcher, scan: JsonScan = JSON_START) -> list[int] | None:
        """Tokens that take ``matcher`` (not changed) to a complete answer; [] if it is complete now;
        None if the bounded search finds none. For JSON, states with the same scan (the text outside
        strings and numbers, the open string's or number's length) count as one, the first (shortest)
        path kept: the characters inside rarely matter to what may follow, and this keeps the search from
        filling its beam with strings that differ only in their characters. Other kinds: the same text."""
        if matcher.is_accepting():
            return []
        scan = rebase(scan) if self.json else b""  # text is counted from here
        frontier, seen = [(matcher, [], scan, 0)], {scan}
        for _ in range(DEPTH):
            children = []
            for m, path, sc, forced in frontier:
                is_ff, moves = self._moves(m)
                for move in moves:
                    child = m.deep_copy()
                    if child.try_consume_tokens(move) != len(move) or child.is_error():
                        continue
                    if child.is_accepting():
                        return path + move
                    data = b"".join(self.token_bytes(t) for t in move)
                    nsc = json_scan(sc, data) if self.json else sc + data
                    if nsc in seen:
                        continue
                    seen.add(nsc)
                    n_forced = forced + (len(move) if is_ff else 0)
                    rank = (json_depth(nsc), -n_forced, nsc[4]) if self.json else (0, -n_forced, 0)
                    children.append((rank, len(path) + len(move), len(children), (child, path + move, nsc, n_forced)))
            if not children:
                return None
            children.sort(key=lambda c: c[:3])  # fewest open brackets, most forced progress, least inside, shortest
            frontier = [c[3] for c in children[:BEAM]]
        return None
