"""The load benchmark: a short real load on the local server, and errors counted by type."""

from __future__ import annotations

import json

from serving.bench import Sample, load_prompts, main, percentile, summarize
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


def test_a_prompts_file_that_is_not_there_is_an_error_naming_it(tmp_path, capsys):
    # Refused before any server is asked: the URL answers nothing.
    missing = tmp_path / "promts.jsonl"
    assert main(["--url", "http://127.0.0.1:9", "--prompts", str(missing), "--out", str(tmp_path)]) == 2
    assert f"error: --prompts {missing}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_a_prompts_file_with_a_broken_line_or_no_prompts_is_an_error(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n\n{"prompt": "no end"\n', encoding="utf-8")
    assert main(["--url", "http://127.0.0.1:9", "--prompts", str(broken)]) == 2
    assert f"error: {broken}, line 3: not JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"answer": "no prompt here"}\n', encoding="utf-8")
    assert main(["--url", "http://127.0.0.1:9", "--prompts", str(empty)]) == 2
    assert f"error: {empty}: no prompts in it" in capsys.readouterr().err


def test_prompts_come_from_the_file_named(tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "一"}, {"messages": [{"role": "user", "content": "二"}]}, {"instruction": "三"}]
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert load_prompts(prompts) == ["一", "二", "三"]
