"""The demo command runs, prints the metrics table and compiles once."""

from jaxreg.cli import main


def test_demo_prints_table_and_compiles_once(capsys):
    assert main(["demo", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "term" in out and "grad_norm" in out and "kl" in out
    assert "compiled 1 time(s) for 3 calls" in out
