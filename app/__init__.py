"""Web app: erase a concept in the browser and compare original vs unlearned generations side by side.

``python -m app`` (or ``erasure-app``) serves it on 127.0.0.1:7860. The UI (:mod:`app.main`, :mod:`app.tabs`)
only does I/O; all work goes through :class:`app.service.AppService`.
"""
