"""The load benchmark: a short real load on the local server, and errors counted by type."""

from __future__ import annotations

import json

from serving.bench import Sample, main, percentile, summarize
from tests.serving.backends.fake_tgi import FakeTGI
from tests.serving.conftest import API_KEY


def test_percentiles_interpolate():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.05


def test_a_short_load_on_the_local_server_reports_figures(local_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("API_KEY", API_KEY)
    out = tmp_path / "bench"
    code = main(
        ["--url", local_server.url, "-n", "4", "-c", "1,2", "--max-new-tokens", "6", "--out", str(out)]
    )
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["server"]["backend"] == "local" and result["server"]["model"] == "quickstart"
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert (level["requests"], level["ok"], level["errors"]) == (4, 4, {})
        assert level["output_tokens"] > 0 and level["output_tokens_per_s"] > 0
        assert level["ttft_ms"]["p50"] > 0 and level["ttft_ms"]["p95"] >= level["ttft_ms"]["p50"]
        assert level["e2e_ms"]["p50"] >= level["ttft_ms"]["p50"]
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert (
        "| concurrency |" in printed.out and "concurrency 2" in printed.err
    )  # the table and the progress bar


def test_errors_are_counted_by_type(tmp_path, capsys):
    server = FakeTGI()
    try:
        # No warm-up, no retries: the first 2 of the 3 requests are refused, the third is answered.
        overloaded = (429, {"error": "Model is overloaded", "error_type": "overloaded"}, {})
        server.queued.extend([overloaded, overloaded])
        code = main(
            [
                "--url",
                server.url,
                "-n",
                "3",
                "-c",
                "1",
                "--warmup",
                "0",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        server.stop()
    assert code == 0
    (level,) = json.loads((tmp_path / "bench.json").read_text())["levels"]
    assert (level["ok"], level["errors"]) == (1, {"OverloadedError": 2})
    assert json.loads((tmp_path / "bench.json").read_text())["server"]["backend"] == "tgi"


def test_summary_of_a_failed_level_has_no_figures():

    level = summarize([Sample(ok=False, error="ServerTimeoutError")], concurrency=1, wall=1.0)
    assert level["errors"] == {"ServerTimeoutError": 1} and level["ttft_ms"] == {"p50": None, "p95": None}
