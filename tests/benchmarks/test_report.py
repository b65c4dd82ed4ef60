"""benchmarks/report.py: `make bench` refreshes only its own block of RESULTS.md."""
from benchmarks import report as lat


def test_block_is_appended_then_replaced_in_place(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## 1. kept\ntext one\n")
    lat.refresh_results_block(md, "| a |\n| 1 |\n")
    first = md.read_text()
    assert first.startswith("# Results\n\n## 1. kept\ntext one\n") and "| 1 |" in first
    md.write_text(first + "\n## 9. after\ntail\n")
    lat.refresh_results_block(md, "| a |\n| 2 |")
    second = md.read_text()
    assert "| 2 |" in second and "| 1 |" not in second
    assert second.count(lat.BLOCK_START) == 1 and second.count(lat.BLOCK_END) == 1
    assert "## 1. kept\ntext one" in second and second.rstrip().endswith("## 9. after\ntail")
