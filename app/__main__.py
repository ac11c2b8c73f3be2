"""``python -m erasure_app``: serve the web app (see ``python -m erasure_app --help``)."""

if __name__ == "__main__":
    from erasure.threads import run_entry_point

    raise SystemExit(run_entry_point("erasure_app.main:main"))
