"""Stubs of the compiled Karabo Bridge codec (same API as kbstream._pure)."""

from collections.abc import Iterable, Mapping
from typing import Any

ENCODE_VERSIONS: tuple[str, ...]
MAX_DEPTH: int
MAX_NDIM: int
MAX_CONTAINERS: int

def make_dummy_timestamps() -> dict[str, Any]: ...
def packb(obj: Any) -> bytes: ...
def unpackb(buf: Any, *, max_containers: int | None = None) -> Any: ...
def serialize(
    data: Mapping[Any, Mapping[str, Any]],
    metadata: Mapping[Any, Mapping[str, Any]] | None = None,
    protocol_version: str = "2.2",
    dummy_timestamps: bool = False,
) -> list[bytes | memoryview]: ...
def deserialize(
    frames: Iterable[Any], *, max_containers: int | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]: ...

class Buffer:
    """Read-only bytes-like protocol 1.0 frame (>= 1 MiB) whose memory is recycled."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...

def release_pool() -> int: ...
