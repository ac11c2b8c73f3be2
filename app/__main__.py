"""``python -m app``: serve the web app (see ``python -m app --help``)."""

from app.main import main

if __name__ == "__main__":
    raise SystemExit(main())
