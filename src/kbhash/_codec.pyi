"""Type stubs of the compiled Karabo Hash codec (same API as kbhash._pure)."""

from collections.abc import Sequence

from typing_extensions import Buffer

from .hash import Hash

MAX_DEPTH: int
TYPE_IDS: dict[str, int]

def encode(h: Hash) -> list[bytes | memoryview]: ...
def encode_bytes(h: Hash) -> bytes: ...
def decode(data: Buffer | Sequence[Buffer], *, copy: bool = ..., max_objects: int | None = ...) -> Hash: ...
def decode_prefix(data: Buffer | Sequence[Buffer], *, max_objects: int | None = ...) -> tuple[Hash, int]: ...
