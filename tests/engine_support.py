"""The SFTP engine on given input, without a transport: for tests that need exact cuts or timing."""

from __future__ import annotations

from typing import Any


class PieceSocket:
    """The engine's channel: the given input pieces, then EOF; the replies collected in ``sent``.

    A piece is bytes or a view (None: a packet that brought no input for the
    engine, as the fast path can return); one longer than a read asks for is
    handed out in parts, as a channel would.
    """

    out_max_packet_size = 32768

    def __init__(self, pieces: list[Any]) -> None:
        self.pieces = list(pieces)
        self.sent = bytearray()

    class _Transport:
        def get_log_channel(self) -> str:
            return "x2go_sftp.test"

        def get_hexdump(self) -> bool:
            return False

    def get_transport(self) -> Any:
        return self._Transport()

    def recv(self, nbytes: int) -> Any:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if piece is not None and len(piece) > nbytes:
            self.pieces.insert(0, piece[nbytes:])
            piece = piece[:nbytes]
        return piece

    def recv_ready(self) -> bool:
        return bool(self.pieces)

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)
