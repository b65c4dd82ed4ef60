"""After `make test` in CI: list the optional stacks .ci/run installed and how many tests each ran
and skipped (from the JSON tests/conftest.py writes to $EDGE_AD_STACK_REPORT); exit 1 when a stack
that installed had a test skip or ran none, since then CI did not exercise what it claims to.

    python .ci/check_stacks.py REPORT.json [INSTALLED_STACK ...]
"""
import json
import pathlib
import sys


def main(argv) -> int:
    if not argv:
        print("usage: check_stacks.py REPORT.json [INSTALLED_STACK ...]", file=sys.stderr)
        return 2
    report_path, installed = pathlib.Path(argv[0]), set(argv[1:])
    if not report_path.is_file():
        print(f"ci: no stack report at {report_path} (did the test run start?)")
        return 1
    tally = json.loads(report_path.read_text())
    rc = 0
    print(f"\n{'stack':<12}{'installed':>10}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for stack in sorted(set(tally) | installed):
        t = tally.get(stack, {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": []})
        inst = stack in installed
        print(f"{stack:<12}{'yes' if inst else 'no':>10}{t['passed']:>8}{t['failed']:>8}{t['skipped']:>9}")
        if inst and (t["skipped"] or not t["passed"] + t["failed"]):
            rc = 1
            why = t["skip_reasons"][:5] or ["no test of this stack ran"]
            print(f"  ci: {stack} installed but not exercised:\n    " + "\n    ".join(why))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
