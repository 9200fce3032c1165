"""``patchrec prepare`` through ``patchrec.cli.main``."""

import filecmp

import pytest
from conftest import shared_path

from patchrec import cli
from patchrec.data.release import load_release


@pytest.fixture(autouse=True)
def only_prepare(monkeypatch):
    # Other subcommands are developed in parallel; a missing or broken one must not fail these tests.
    monkeypatch.setattr(cli, "COMMANDS", {"prepare": "patchrec.commands.prepare"})


def test_synthetic(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["prepare", "--synthetic", "--users", "200", "--items", "300", "--seed", "5", "--out", str(out)]
    assert cli.main(args) == 0
    line = capsys.readouterr().out.strip()
    ds = load_release(out)
    assert ds.num_users == 200 and ds.num_items == 300
    assert line.startswith("synthetic-u200-i300-s5: 200 users, 300 items, ")
    assert f"{len(ds.items)} interactions" in line and "train=" in line and "test=" in line
    assert len(line.splitlines()) == 1
    # refuses a non-empty --out, then --force replaces it (same seed -> same files)
    assert cli.main(args) == 2
    assert "not empty" in capsys.readouterr().err
    copy = tmp_path / "copy"
    assert cli.main([*args[:-1], str(copy)]) == 0
    assert cli.main([*args, "--force"]) == 0
    assert filecmp.cmp(out / "sequences.jsonl", copy / "sequences.jsonl", shallow=False)


def test_force_never_deletes_other_files(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["prepare", "--synthetic", "--users", "20", "--out", str(out), "--force"]) == 2
    assert "not release files" in capsys.readouterr().err and (out / "notes.txt").exists()


def test_argument_errors(tmp_path, capsys):
    assert cli.main(["prepare", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --raw" in capsys.readouterr().err
    assert cli.main(["prepare", "--synthetic", "--format", "ml-1m", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["prepare", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_raw_ml1m_fixture_writes_release_ids(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "movies.dat").write_text("1::A (1990)::X\n3::B, The (1991)::Y\n", encoding="latin-1")
    (raw / "ratings.dat").write_text("9::3::5::20\n9::1::4::10\n8::1::5::30\n8::3::5::31\n")
    assert cli.main(["prepare", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 0
    assert "ml-1m: 2 users, 2 items, 4 interactions" in capsys.readouterr().out
    assert (tmp_path / "out" / "id2title.txt").read_text() == "0||A\n2||The B\n"
    first = (tmp_path / "out" / "sequences.jsonl").read_text().splitlines()[0]
    assert first.startswith('{"user": 0, "items": [0, 2]')


def test_raw_ml100k_matches_release_files(tmp_path, capsys):
    raw = shared_path("data", "raw", "ml-100k")
    release = shared_path("data", "patchrec", "ml-100k")
    assert cli.main(["prepare", "--raw", str(raw), "--format", "ml-100k", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "682 users, 1682 items, 51824 interactions" in out
    assert "train=47749 val=1005 test=1024" in out  # item order differs only inside same-second groups
    assert filecmp.cmp(release / "prompt.txt", tmp_path / "o" / "prompt.txt", shallow=False)
    ours = (tmp_path / "o" / "id2title.txt").read_text(encoding="utf-8").splitlines()
    theirs = (release / "id2title.txt").read_text(encoding="utf-8").splitlines()
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) == 1682 - 7  # 7 accents lost in u.item
