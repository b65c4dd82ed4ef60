"""README contract: starts with the two commands; its export-format table is the one the code uses."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    head = text[: text.index("## ")]
    assert "make demo" in head and "make test" in head
    assert head.index("make demo") < head.index("make test")


def test_readme_export_table_matches_formats_table():
    from export.formats import markdown_table

    text = (ROOT / "README.md").read_text()
    assert markdown_table().strip() in text, "README export table is stale: paste export.formats.markdown_table()"


def test_makefile_targets_and_ci_run_make_test():
    mk = (ROOT / "Makefile").read_text()
    for target in ("demo:", "test:", "bench:", "venv:"):
        assert target in mk
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for name in ("demo.py",):
        assert (ROOT / name).is_file()
