"""--hugetlb-budget and --hugetlb-keep: parsed from flags and TOML, refused when malformed."""

from __future__ import annotations

from pathlib import Path

import pytest

from memplug.common.errors import InvalidArgument
from memplug.common.sizes import GiB, MiB
from memplug.daemon.config import load
from memplug.daemon.engine.hugegrowth import Budget


def test_budgets_from_flags_and_toml(tmp_path: Path) -> None:
    config, _ = load(
        ["--hugetlb-budget", "2M:8G", "--hugetlb-budget", "1G:16G@0", "--hugetlb-keep"]
    )
    assert config.hugetlb_budgets == (Budget(2 * MiB, 8 * GiB), Budget(GiB, 16 * GiB, 0))
    assert config.hugetlb_keep
    toml = tmp_path / "memplugd.toml"
    toml.write_text('hugetlb-budget = ["2M:256M"]\nhugetlb-keep = false\n')
    config, _ = load(["--config", str(toml)])
    assert config.hugetlb_budgets == (Budget(2 * MiB, 256 * MiB),)
    assert not config.hugetlb_keep
    assert Budget(2 * MiB, 256 * MiB, 3).flag() == "2M:256M@3"


@pytest.mark.parametrize("text", ["2M", "2M:", "x:8G", "3M:8G", "2M:8G@", "2M:8G@a"])
def test_malformed_budgets_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="hugetlb-budget"):
        load(["--hugetlb-budget", text])


def test_a_budget_for_a_pool_the_kernel_lacks_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="offers no pool"):
        load(["--hugetlb-budget", "2M:8G@4095"])
