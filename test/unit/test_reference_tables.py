"""The tables in docs/ are generated from their declarations (tools/reference_tables.py): the committed
pages hold exactly what the declarations give, and a new setting, metric or option shows up in its
table with nothing else edited."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import reference_tables  # noqa: E402

from nvembed_triton import settings  # noqa: E402
from nvembed_triton.model import metrics  # noqa: E402
from nvembed_triton.settings import LAUNCHER, MODEL, SETTINGS, Setting, positive_int  # noqa: E402


def test_the_committed_pages_hold_the_generated_tables():
    command = [sys.executable, str(ROOT / "tools" / "reference_tables.py"), "--check"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("table", reference_tables.TABLES, ids=lambda table: table.name)
def test_a_stale_table_is_rewritten_and_the_rest_of_the_page_kept(table):
    page = (ROOT / table.page).read_text()
    first_row = table.render().splitlines()[2]
    stale = page.replace(first_row, first_row.replace("|", "| stale |", 1))
    assert stale != page
    assert table.written_into(stale) == page


def test_a_page_without_its_markers_is_refused():
    with pytest.raises(SystemExit, match="no settings table"):
        reference_tables.TABLES[0].written_into("# Configuration\n")


def test_a_new_setting_is_a_row(monkeypatch):
    knob = Setting("pooling_threads", "4", "threads for the pooling head", MODEL, positive_int)
    launcher_knob = Setting("probe_interval_s", "5", "seconds between health probes", LAUNCHER, settings.seconds,
                            env="NVEMBED_PROBE_EVERY", flag="--probe-interval")  # fmt: skip
    monkeypatch.setattr(reference_tables, "SETTINGS", (*SETTINGS, knob, launcher_knob))
    table = reference_tables.settings_table()
    assert "| `pooling_threads` | `NVEMBED_POOLING_THREADS` | - | `4` | model | threads for the pooling head |" in table
    assert "| `probe_interval_s` | `NVEMBED_PROBE_EVERY` | `--probe-interval` | `5` | serve.sh |" in table


def test_a_new_metric_is_a_row_with_its_label_values(monkeypatch):
    counters = {**metrics.COUNTERS, "nvembed_cache_hits_total": ("Answers served from the cache, by prompt", ("prompt",))}
    monkeypatch.setattr(reference_tables, "COUNTERS", counters)
    rows = reference_tables.metrics_table().splitlines()
    assert "| `nvembed_cache_hits_total` | counter | `prompt` | Answers served from the cache, by prompt |" in rows
    # each label's values are listed once, where it first appears (the newcomer test reads them there)
    assert sum("(query, document, custom)" in row for row in rows) == 1
    assert len(rows) == 2 + 1 + len(counters)  # header, the executing gauge, one row per counter
