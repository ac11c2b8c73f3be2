"""``python -m erasure_eval``: the evaluation CLI (see ``python -m erasure_eval --help``)."""

if __name__ == "__main__":
    from erasure.threads import run_entry_point

    raise SystemExit(run_entry_point("erasure_eval.cli:main"))
