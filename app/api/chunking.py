"""Large generation requests decode in chunks under a token budget, on the engine thread.

A chunk's memory is its padded batch: rows x (longest prompt + max_new_tokens) positions in every
KV cache, so that product is what `MAX_BATCH_TOKENS` bounds. Rows keep their global index (and
seed), so stitching the chunks' outputs gives exactly the unchunked result: a row's tokens never
depend on its batch neighbours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

from lda import Row, RowOutput, TokenEvent

Events = Iterator[TokenEvent | RowOutput]


def plan_chunks(rows: Sequence[Row], max_new_tokens: int, budget: int) -> list[range]:
    """Split rows, in order, into contiguous chunks of at most `budget` padded tokens each.

    Rows that share a prompt (consecutive rows with the same prompt ids) stay in one chunk, so the
    decode can prefill that prompt once, unless they alone exceed the budget; then they fill whole
    chunks. A single row over the budget still runs, alone.
    """
    chunks: list[range] = []
    start = end = width = 0  # the open chunk is rows[start:end], its longest prompt `width`

    def cost(n: int, w: int) -> int:
        return n * (w + max_new_tokens)

    for group in _prompt_groups(rows):
        length = len(rows[group.start].prompt_ids)
        if end > start and cost(end - start + len(group), max(width, length)) > budget:
            chunks.append(range(start, end))
            start, width = end, 0
        width = max(width, length)
        per_chunk = max(1, budget // (width + max_new_tokens))
        end = group.stop
        while end - start > per_chunk:  # one prompt's rows overflow a chunk: split them
            chunks.append(range(start, start + per_chunk))
            start, width = start + per_chunk, length
    if end > start:
        chunks.append(range(start, end))
    return chunks


def _prompt_groups(rows: Sequence[Row]) -> Iterator[range]:
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].prompt_ids != rows[start].prompt_ids:
            yield range(start, i)
            start = i


def chunked_events(
    decode: Callable[[list[Row]], Events], rows: Sequence[Row], chunks: Sequence[range]
) -> Events:
    """Decode chunk after chunk, renumbering each chunk's events to global row indices.

    Closing this generator (cancellation) closes the running chunk's decode; later chunks never start.
    """
    for chunk in chunks:
        events = decode([rows[i] for i in chunk])
        try:
            for event in events:
                yield dataclasses.replace(event, row=event.row + chunk.start)
        finally:
            events.close()  # type: ignore[attr-defined]
