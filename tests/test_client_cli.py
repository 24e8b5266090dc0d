"""``python -m service.client``: argument handling, rows, summary and exit status."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.client.cli import main
from service.model_slot import load_model
from service.score_names import SCORE_NAMES
from service.server import ServerThread
from tests.service_helpers import ROOT, png_bytes, random_pixels, serve_config

TOKEN = "cli-token"


@pytest.fixture(scope="module")
def server(trained_bundle: Path) -> Iterator[ServerThread]:
    config = serve_config(trained_bundle, token=TOKEN)
    with ServerThread(config, model=load_model(trained_bundle, "cpu", threads=1)) as running:
        yield running


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of five images, two of them in a subfolder, and a text file that is skipped."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "c.png", "sub/d.png", "sub/e.PNG"]):
        (folder / name).write_bytes(png_bytes(random_pixels(i)))
    (folder / "notes.txt").write_text("not an image")
    return folder


def score(server: ServerThread, *args: str) -> int:
    return main(["score", f"127.0.0.1:{server.port}", "--token", TOKEN, "--no-progress", *args])


def test_folders_are_scored_recursively_into_csv(
    server: ServerThread, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rows.csv"
    assert score(server, str(images), "--out", str(out), "--batch-size", "2") == 0
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).relative_to(images).as_posix() for r in rows] == [
        "a.png", "b.png", "c.png", "sub/d.png", "sub/e.PNG",
    ]  # fmt: skip
    assert all(r["id"] == r["path"] and r["error"] == "" for r in rows)
    assert all(
        float(r["combined_p_value"]) > 0 and r["is_anomaly"] in ("True", "False") for r in rows
    )
    anomalies = sum(r["is_anomaly"] == "True" for r in rows)
    assert capsys.readouterr().out.strip() == f"scored 5, anomalies {anomalies}, failures 0"
    # A column for every score and its p-value, whatever the scores are.
    for name in SCORE_NAMES:
        assert all(float(r[name]) >= 0 and 0 < float(r[f"{name}_p_value"]) <= 1 for r in rows)


def test_stream_and_batches_give_the_same_rows(
    server: ServerThread, images: Path, tmp_path: Path
) -> None:
    batched, streamed = tmp_path / "batched.jsonl", tmp_path / "streamed.jsonl"
    assert score(server, str(images), "--out", str(batched), "--concurrency", "2") == 0
    assert score(server, str(images), "--stream", "--out", str(streamed)) == 0
    read = [[json.loads(line) for line in f.read_text().splitlines()] for f in (batched, streamed)]
    assert read[0] == read[1] and len(read[0]) == 5


def test_failures_get_a_row_and_a_non_zero_status(
    server: ServerThread, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = images / "broken.png"
    bad.write_bytes(b"not a png")
    for mode in ([], ["--stream"]):
        out = tmp_path / "rows.jsonl"
        assert score(server, str(images), "--out", str(out), *mode) == 1
        rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
        assert rows["broken.png"]["error"].startswith("INVALID_ARGUMENT: image ")
        assert rows["broken.png"]["is_anomaly"] is None
        assert sum(r["error"] is None for r in rows.values()) == 5
        captured = capsys.readouterr()
        assert captured.out.strip().endswith("failures 1")
        assert "broken.png: INVALID_ARGUMENT" in captured.err


def test_a_refused_call_fails_every_image_of_it(
    server: ServerThread, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{server.port}"
    status = main(["score", target, str(images), "--no-progress", "--token", "wrong"])
    assert status == 1
    captured = capsys.readouterr()
    assert "scored 0, anomalies 0, failures 5" in captured.out
    assert "call failed: UNAUTHENTICATED" in captured.err


def test_rows_to_stdout_put_the_summary_on_stderr(
    server: ServerThread, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert score(server, str(images / "a.png"), "--out", "-") == 0
    captured = capsys.readouterr()
    (row,) = [json.loads(line) for line in captured.out.splitlines()]
    assert row["path"] == str(images / "a.png") and row["error"] is None
    assert all(isinstance(row[name], float) for name in SCORE_NAMES)
    assert "scored 1, anomalies" in captured.err


def test_info_prints_the_model_as_json(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", f"127.0.0.1:{server.port}", "--token", TOKEN]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["execution_provider"] == "CPUExecutionProvider"
    assert info["model_id"] == server.server.models.current.model_id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "t", "/nonexistent/x.png"], "/nonexistent/x.png: no such file or folder"),
        (["score", "t", "{empty}"], "no image files under"),
        (["score", "t", "{image}", "--out", "rows.txt"], "should end in .csv or .jsonl"),
        (["score", "t", "{image}", "--cert", "{image}"], "--cert and --key go together"),
        (["info", "a.example:1,b.example:1"], "several targets must be IP addresses"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    image = tmp_path / "one.png"
    image.write_bytes(png_bytes(random_pixels(0)))
    filled = [a.format(empty=tmp_path / "empty", image=image) for a in args]
    assert main(filled) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "t"], "the following arguments are required: PATH"),
        (["score", "t", "x", "--batch-size", "0"], "'0' is not a positive number"),
        (["info", "t", "--retries", "-1"], "'-1' is not a number of retries from 0 to 4"),
        (["info", "t", "--retries", "5"], "'5' is not a number of retries from 0 to 4"),
        (["info", "t", "--retries", "many"], "'many' is not a number of retries"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments_are_refused_by_the_parser(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_server_fails_info_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.client", "info", "127.0.0.1:1", "--retries", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("anomaly-client: error: 127.0.0.1:1: call failed: UNAVAILABLE")
