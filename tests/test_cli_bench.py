"""`genkit bench`: the command-line alias of `python -m benchmarks`."""

import sys

import pytest

from genkit.cli import main


def test_bench_help_lists_the_peer_benchmarks(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: genkit bench")
    for name in ("train", "sample", "memory", "frechet"):
        assert name in out


def test_bench_refuses_an_unknown_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--no-write", "nosuch"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_bench_outside_a_checkout_is_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks.__main__", None)  # as if benchmarks/ were not importable
    assert main(["bench", "train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "genkit bench: error: the benchmarks live in the source checkout" in err
