"""The error tree of the sketches layer. Nothing here imports datasketches."""


class SketchError(Exception):
    """Root of every error raised by :mod:`sketches`."""


class SketchKindError(SketchError):
    """A kind string is unknown or malformed (e.g. ``req-hra-k0``)."""


class SketchKindMismatch(SketchError):
    """Two sketches of different kinds were asked to merge, or bytes of one kind were read as another."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sketch kind mismatch: expected {expected!r}, got {actual!r}")
        self.expected = expected
        self.actual = actual


class CorruptSketchError(SketchError):
    """Serialized bytes are not a well-formed sketch of the expected kind."""
