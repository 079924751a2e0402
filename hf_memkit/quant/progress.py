"""Progress bars for the long passes (GPTQ and Block-AP block by block, calibration capture): a bar on an
interactive terminal, nothing in a log file (tqdm's ``disable=None``), and a line per pass in the log."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

logger = logging.getLogger("hf_memkit")


def blocks_progress(blocks: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
    from tqdm.auto import tqdm

    logger.info("hf_memkit: %s over %s blocks", desc, total if total is not None else "the")
    yield from tqdm(blocks, desc=f"hf_memkit {desc}", total=total, unit="block", disable=None, leave=False)
