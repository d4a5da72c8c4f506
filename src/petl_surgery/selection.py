"""Turning the ``layers`` argument into block indices."""

from __future__ import annotations

import operator
from typing import Iterable, List, Optional, Union

from .errors import OptionError

LayerSelection = Optional[Union[int, slice, Iterable[int]]]


def _index(value: object) -> int:
    if isinstance(value, bool):
        raise OptionError(f"layers must be ints; got the bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise OptionError(f"layers must be ints; got {value!r} ({type(value).__name__})") from None


def select_layers(layers: LayerSelection, count: int) -> List[int]:
    """Block indices chosen by ``layers``, sorted.

    ``None`` takes every block; an int, an iterable of ints or a slice picks blocks by their global index,
    negative indices counting from the end as in Python. Out-of-range indices, slice bounds past the
    blocks (``2:10`` on 4 blocks: Python would clip it to ``2:4``), repeated and empty selections are refused.
    """
    if layers is None:
        return list(range(count))
    if isinstance(layers, slice):
        for bound in (layers.start, layers.stop):  # Python clips a slice; a bound past the blocks is a mistake
            if isinstance(bound, int) and not -count <= bound <= count:
                raise OptionError(
                    f"layers={layers!r} is out of range: the model has {count} blocks (a slice's bounds run "
                    f"from -{count} to {count})"
                )
        try:
            chosen = list(range(count))[layers]
        except (TypeError, ValueError) as error:
            raise OptionError(f"layers={layers!r} is not a valid slice: {error}") from None
        if not chosen:
            raise OptionError(f"layers={layers!r} selects no block of the model's {count} blocks")
        return sorted(chosen)
    if isinstance(layers, (str, bytes)):
        raise OptionError(f"layers must be an int, an iterable of ints or a slice; got {layers!r}")
    if isinstance(layers, Iterable):
        requested = [_index(value) for value in layers]
    else:
        requested = [_index(layers)]
    if not requested:
        raise OptionError("layers is empty: it selects no block")
    chosen = []
    for index in requested:
        if not -count <= index < count:
            raise OptionError(
                f"layer {index} is out of range: the model has {count} blocks "
                f"(indices 0..{count - 1}, or -{count}..-1 from the end)"
            )
        resolved = index % count
        if resolved in chosen:
            raise OptionError(f"layer {index} is selected twice (block {resolved})")
        chosen.append(resolved)
    return sorted(chosen)
