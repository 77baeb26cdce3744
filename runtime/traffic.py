"""What crosses between the host and the device, counted where it happens (runtime/bmrt.py): the
figures that decide a board's speed, which the simulator's time does not show (its copies are
host memcpy)."""
from dataclasses import asdict, dataclass, fields


@dataclass
class Traffic:
    h2d: int = 0        # bytes host -> device
    d2h: int = 0        # bytes device -> host
    d2d: int = 0        # bytes device -> device
    launches: int = 0   # nets launched
    syncs: int = 0      # waits for the device

    def __sub__(self, other: "Traffic") -> "Traffic":
        return Traffic(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def copy(self) -> "Traffic":
        return Traffic(**asdict(self))

    def per(self, count: int) -> dict:
        """Each figure divided by `count` (tokens): what one costs on average."""
        return {name: value / count for name, value in asdict(self).items()} if count else {}

    def as_dict(self) -> dict:
        return asdict(self)


def size(n: float) -> str:
    """1.0 KiB, 4 B, 256.0 MiB: bytes as people read them."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def per_token_line(decode: Traffic, tokens: int) -> str:
    """The chat's stats line part: `h2d 1.0 KiB/token, d2h 4 B/token`."""
    if not tokens:
        return ""
    each = decode.per(tokens)
    return (f"h2d {size(each['h2d'])}/token, d2h {size(each['d2h'])}/token, d2d {size(each['d2d'])}/token, "
            f"{each['launches']:.0f} launches and {each['syncs']:.0f} sync/token")
