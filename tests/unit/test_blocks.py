"""Every block of ours passes Prefect's own standard block tests, as prefect-aws's do.

A block is part of the UI: a description, a documentation link, a description
on every field, and an example that imports and loads it.
"""

from __future__ import annotations

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites.blocks import BlockStandardTestSuite

from tasks.credentials import NanoPhotoCredentials

OUR_BLOCKS: list[type[Block]] = [NanoPhotoCredentials]


@pytest.mark.parametrize("block", OUR_BLOCKS, indirect=True)
class TestOurBlocks(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, request: pytest.FixtureRequest) -> type[Block]:
        chosen: type[Block] = request.param
        return chosen
