"""``python -m erasure``: the erasure CLI (see ``python -m erasure --help``)."""

if __name__ == "__main__":
    from erasure.threads import run_entry_point

    raise SystemExit(run_entry_point("erasure.cli:main"))
