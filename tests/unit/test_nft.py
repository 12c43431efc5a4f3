"""nft's refusals, as a person reads them: one line, nft's own words."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tailsfw.nft import MAX_ERROR, error_text, list_in_child

DOCUMENT = json.dumps({"nftables": [{"add": {"table": {"family": "ip", "name": "x" * 5000}}}]})


def test_the_echoed_document_and_carets_are_left_out() -> None:
    stderr = (
        "internal:0:0-0: Error: Could not process rule: No such file or directory\n"
        f"{DOCUMENT}\n{'^' * 80}\n"
        "internal:0:0-0: Error: Could not process rule: No such file or directory\n"
    )
    assert error_text(stderr, 1) == "Error: Could not process rule: No such file or directory"


def test_distinct_errors_are_kept_in_order_and_bounded() -> None:
    stderr = "Error: syntax error, unexpected '{'\n" + DOCUMENT + "\nError: " + "y" * 1000 + "\n"
    text = error_text(stderr, 1)
    assert text.startswith("Error: syntax error, unexpected '{'; Error: yyy")
    assert "\n" not in text and len(text) == MAX_ERROR


def test_no_words_at_all_gives_the_code() -> None:
    assert error_text("", 3) == "nft failed with code 3"


def test_a_listing_child_given_up_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    slow = tmp_path / "slow-nft"
    slow.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    slow.chmod(0o755)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(list_in_child(str(slow)), 0.3)

    asyncio.run(main())
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left running
